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


def fail(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the CLI in this process: a user mistake must end in SystemExit(2) and one stderr line
    (any other exception would propagate here, as it would print a traceback)."""
    from fusedlr.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "args,match",
    [
        (("plot", "--schedule", "cosine", "--total", "100", "--lr", "-1"), "--lr"),
        (("plot", "--schedule", "cosine", "--total", "0"), "--total"),
        (("plot", "--schedule", "cosine", "--warmup", "20", "--total", "10"), "num_warmup_steps"),
        (("plot", "--schedule", "step", "--total", "10", "--arg", "step_size=0"), "step_size"),
        (("plot", "--schedule", "step", "--total", "10", "--arg", "nonsense"), "key=value"),
        (("plot", "--schedule", "polynomial", "--total", "10", "--arg", "lr_end=0.5"), "--lr"),
        (("plot", "--schedule", "cosinus", "--total", "10"), "invalid choice"),
        (("demo", "--steps", "0"), "--steps"),
        (("demo", "--device", "bogus"), "device"),
        (("lr-find", "--start-lr", "1", "--end-lr", "0.1"), "start_lr"),
    ],
)
def test_user_mistakes_give_one_line_without_a_traceback(capsys, args: tuple[str, ...], match: str) -> None:
    assert match in fail(capsys, *args)


def test_plot_takes_lists_as_comma_separated_values(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    text = run("plot", "--schedule", "multistep", "--arg", "milestones=100,500", "--arg", "gamma=0.5", "--total", "1000",
               "--lr", "0.2", "--out", str(tmp_path / "m.png"))
    assert "lr(0)=0.2" in text and "lr(last)=0.05" in text


def test_lr_find_runs_on_the_demo_model(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "f.png"
    text = run("lr-find", "--num-iter", "40", "--device", "cpu", "--backend", "torch", "--out", str(out))
    assert "suggested lr" in text and out.read_bytes()[:4] == b"\x89PNG"
