"""The command line: plot writes a PNG of the schedule, demo trains and reports, info lists backends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "fusedlr", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "lr.png"
    text = run("plot", "--schedule", "cosine", "--warmup", "200", "--total", "10000", "--out", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "max=1 at k=200" in text


def test_plot_passes_extra_schedule_arguments(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "wsd.png"
    text = run("plot", "--schedule", "warmup_stable_decay", "--warmup", "10", "--total", "100",
               "--arg", "num_decay_steps=20", "--arg", "min_lr_ratio=0.1", "--out", str(out))
    assert "lr(last)=0.1" in text


def test_demo_trains_and_the_loss_falls() -> None:
    text = run("demo", "--steps", "120", "--log-every", "40", "--device", "cpu", "--backend", "torch")
    losses = [float(line.split()[3]) for line in text.splitlines() if line.startswith("step")]
    assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0]
    assert "grad_norm" in text and "optimizer step" in text


def test_info_lists_every_backend() -> None:
    text = run("info", "--device", "cpu")
    for name in ("torch", "triton", "cuda", "cpu"):
        assert f"  {name}" in text
