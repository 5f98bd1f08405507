"""pytest-benchmark view of the GPU suite: one test per (case, pipeline), timing one full optimizer step.

    pytest benchmarks --benchmark-only [--benchmark-json out.json]     # FUSEDLR_BENCH_CASES=gpt2-124m to filter

Skipped without a CUDA device or without pytest-benchmark, and (so that a plain ``pytest`` on a GPU machine
stays quick) unless ``--benchmark-only`` is given or FUSEDLR_BENCH=1 is set. Timing here is pytest-benchmark's
wall clock around ``step(); torch.cuda.synchronize()``; ``python benchmarks/run.py`` reports CUDA-event
times with bandwidth, memory and the agreement check.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need a CUDA device (the CPU smoke test is test_smoke.py)", allow_module_level=True)
pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

from benchmarks import cases as C
from benchmarks import pipelines as P
from benchmarks import timing as T

# fusedlr already ignores it outside pytest, which resets the warning filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:GradScaler is going to stop passing itself:FutureWarning")
DEVICE = torch.device("cuda")
ROUNDS = int(os.environ.get("FUSEDLR_BENCH_ROUNDS", "20"))
WARMUP = 3
_CASES = C.select_cases(os.environ.get("FUSEDLR_BENCH_CASES"), C.GPU_CASES)
_SPECS = P.pipeline_specs(DEVICE)
_GRADS: dict[str, list[torch.Tensor]] = {}


def _grads(case: C.Case) -> list[torch.Tensor]:
    """The case's preallocated grads, shared by its pipelines (only the current case is kept)."""
    if case.name not in _GRADS:
        _GRADS.clear()
        T.release(DEVICE)
        _GRADS[case.name] = C.make_grads(case, DEVICE, P.BENCH_HYPER.init_scale)
    return _GRADS[case.name]


@pytest.fixture(autouse=True)
def _only_when_asked(request: pytest.FixtureRequest) -> None:
    if not (request.config.getoption("benchmark_only", default=False) or os.environ.get("FUSEDLR_BENCH")):
        pytest.skip("GPU benchmarks run with --benchmark-only (or FUSEDLR_BENCH=1)")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "spec", "reason"),
    [pytest.param(c, s, r, id=f"{c.name}/{s.name}") for c in _CASES for s, r in _SPECS],
)
def test_step(benchmark, case: C.Case, spec: P.PipelineSpec, reason: str | None) -> None:
    """Time one optimizer step of ``spec`` on ``case``."""
    if reason is not None:
        pytest.skip(f"{spec.name}: {reason}")
    if case.name not in _GRADS:
        _GRADS.clear()
        too_big = T.fit_reason(case.memory_needed(), DEVICE)
        if too_big is not None:
            pytest.skip(f"{case.name}: {too_big}")
    pipe = P.build_pipeline(spec, case, DEVICE, P.BENCH_HYPER, _grads(case))
    try:
        benchmark.group = case.name
        benchmark.extra_info.update(
            pipeline=spec.description, num_params=case.num_params, num_tensors=case.num_tensors,
            fused_bytes=case.fused_bytes, state_dtype=str(pipe.state_dtype),
        )
        benchmark.pedantic(T.synced(pipe.step, DEVICE), setup=T.synced(pipe.prepare, DEVICE), rounds=ROUNDS,
                           warmup_rounds=WARMUP, iterations=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            benchmark.extra_info["effective_gbps"] = case.fused_bytes / stats.stats.median / 1e9
    finally:
        del pipe
        T.release(DEVICE)
