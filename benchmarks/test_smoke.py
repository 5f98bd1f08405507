"""CPU smoke test of the benchmark suite, run by the plain ``pytest`` of CI: the report's structure and that
every pipeline's parameters agree after a few steps (no timing assertion)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cases as C
from benchmarks import pipelines as P
from benchmarks import run
from fusedlr import backends

# fusedlr already ignores it outside pytest, which resets the warning filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:GradScaler is going to stop passing itself:FutureWarning")
ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_case_shapes_and_bytes() -> None:
    gpt2 = C.Case("gpt2-124m", "fp32")
    assert gpt2.num_tensors == 148 and gpt2.num_params == 124_439_808
    big = C.Case("gpt-1.3b", "bf16")
    assert big.num_tensors == 2 + 24 * 12 + 2 and big.num_params == 1_315_819_520
    many = C.Case("2000x4096", "fp32")
    assert many.num_tensors == 2000 and many.num_params == 2000 * 4096
    assert C.fused_bytes_per_param(torch.float32) == 32 and C.fused_bytes_per_param(torch.bfloat16) == 24
    assert many.fused_bytes == 32 * 2000 * 4096 and big.fused_bytes == 24 * big.num_params
    # Per mode (bf16 params and grads): reduction reads g 2; the update reads/writes moments of s bytes
    # and a master (4, read instead of the param) or a remainder (2, beside the param).
    expected = {"": (24, 8), "sr": (24, 8), "sr-bf16-states": (2 + 8 + 6, 4), "master": (2 + 14 + 14, 12),
                "remainder": (2 + 14 + 12, 10)}
    for mode, (moved, kept) in expected.items():
        case = C.Case("gpt2-124m", "bf16", mode)
        assert C.fused_bytes_per_param(torch.bfloat16, mode=mode) == moved and case.state_bytes_per_param == kept
        assert case.fused_bytes == moved * case.num_params
    assert [c.name for c in C.select_cases("cpu-modes", [])] == [
        "tiny-gpt-bf16-sr", "tiny-gpt-bf16-sr-bf16-states", "tiny-gpt-bf16-master", "tiny-gpt-bf16-remainder"]
    assert [c.name for c in C.select_cases("gpt-1.3b,2000x4096-bf16", [])] == [
        "gpt-1.3b-fp32", "gpt-1.3b-bf16", "2000x4096-bf16"]
    with pytest.raises(ValueError, match="unknown case"):
        C.select_cases("gpt-7b", [])


def test_torch_lambda_is_fusedlr_schedule() -> None:
    for hyper in (P.BENCH_HYPER, P.check_hyper(C.ALL_CASES["tiny-gpt-fp32"])):
        lam, sched = P.torch_lr_lambda(hyper), hyper.schedule()
        for k in (0, 1, 2, 3, 5, 9, 10, 11, 99, 100, 101, 5_000, 99_999, 100_000, 100_001):
            assert lam(k) == pytest.approx(sched(k), abs=1e-12), k


def test_cpu_run_report_and_agreement(tmp_path: Path) -> None:
    report = run.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--time-limit-s", "120"])

    paths = {k: Path(v) for k, v in report["paths"].items()}
    assert set(paths) >= {"json", "md"} and all(p.parent == tmp_path and p.stat().st_size > 0 for p in paths.values())
    saved = json.loads(paths["json"].read_text())
    for key in ("meta", "copy_bandwidth", "backends", "pipelines", "cases", "targets", "settings"):
        assert key in saved, key
    for key in ("device", "torch", "cuda", "triton", "date", "git_commit"):
        assert key in saved["meta"], key
    assert saved["copy_bandwidth"]["bytes_per_s"] > 0
    assert [t["met"] for t in saved["targets"]] == [None, None, None]  # no GPU case ran
    markdown = paths["md"].read_text()

    runnable = {s.name for s, reason in P.pipeline_specs(CPU) if reason is None}
    assert {"torch-foreach", "torch-fused", "fusedlr-torch"} <= runnable
    assert runnable >= {f"fusedlr-{b}" for b, s in backends.describe(CPU).items() if s == "ok" and b != "cuda"}
    assert [c["name"] for c in saved["cases"]] == [c.name for c in C.CPU_CASES]
    for case in saved["cases"]:
        assert case["status"] == "ok" and f"## {case['name']}" in markdown
        rows = {r["pipeline"]: r for r in case["results"]}
        assert set(rows) == {s.name for s, _ in P.pipeline_specs(CPU)}
        ref = rows[P.REFERENCE.name]["check"]
        assert ref["ref_displacement"] > 10 * ref["atol"], "the checked steps barely moved the params"
        for name, row in rows.items():
            if name not in runnable:
                assert row["status"].startswith("skipped"), row
                continue
            assert row["status"] == "ok", row
            assert row["median_ms"] > 0 and row["iters"] >= 3 and row["gbps"] > 0 and row["x_floor"] > 0
            assert row["vs_torch_fused"] > 0 and row["vs_torch_foreach"] > 0
            check = row["check"]
            assert check["agree"], f"{case['name']}: {name} disagrees with the reference: {check}"
        assert rows["torch-fused"]["vs_torch_fused"] == pytest.approx(1.0)


def test_script_entry_point() -> None:
    out = subprocess.run([sys.executable, "benchmarks/run.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "--cases" in out.stdout and "--quick" in out.stdout and "--out" in out.stdout


def test_two_group_case_agrees_with_torch(tmp_path: Path) -> None:
    case = C.ALL_CASES["tiny-gpt-fp32-2groups"]
    decay, no_decay = C.decay_split(case)
    assert [len(case.shapes[i]) for i in decay] == [2] * len(decay) and len(decay) == 6
    assert {len(case.shapes[i]) for i in no_decay} == {1} and len(decay) + len(no_decay) == case.num_tensors
    report = run.main(["--device", "cpu", "--quick", "--cases", case.name, "--pipelines", "torch-fused,fusedlr-cpu",
                       "--out", str(tmp_path), "--time-limit-s", "120"])
    (saved,) = report["cases"]
    rows = {r["pipeline"]: r for r in saved["results"]}
    assert saved["name"] == case.name and {"torch-fused", "fusedlr-cpu"} <= set(rows)
    for name in ("torch-fused", "fusedlr-cpu"):
        assert rows[name]["status"] == "ok" and rows[name]["check"]["agree"], rows[name]
