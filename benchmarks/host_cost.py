"""Host-cost benchmark: one optimizer step over many tiny parameters, where the host path is the cost.

2000 one-element fp32 params on the CPU, new gradient tensors every step (as ``zero_grad(set_to_none=True)``
gives), global-norm clipping (1.0) and a cosine schedule. Every fusedlr backend that runs here (``opt.step()``;
``fusedlr-cpu`` takes the eager fast path, ``fusedlr-cpu-op-path`` is the same backend through the ops) side by
side with torch's recipes in the same run (``clip_grad_norm_`` + ``torch.optim.AdamW(fused=True)`` or
``(foreach=True)`` + ``LambdaLR.step()``). Reported: median / p10 / p90 wall time per step in microseconds and
torch-fused time / this time, torch-foreach time / this time. Not a test: nothing is asserted (the goal, <= 100 us per fused step, is reported).

    python benchmarks/host_cost.py [--tensors 2000] [--steps 300] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import fusedlr
from fusedlr import backends, fast_step

SCHED = fusedlr.get_schedule("cosine", num_warmup_steps=10, num_training_steps=100_000)
GOAL_US = 100.0


def _fusedlr_step(backend: str, params: list[torch.Tensor]) -> Callable[[], None]:
    opt = fusedlr.AdamW(params, lr=1e-3, schedule=SCHED, max_grad_norm=1.0, backend=backend)
    return opt.step


def _fusedlr_op_path_step(params: list[torch.Tensor]) -> Callable[[], None]:
    """backend="cpu" without its eager fast path (``fusedlr.fast_step``): the ops through the dispatcher."""
    opt = fusedlr.AdamW(params, lr=1e-3, schedule=SCHED, max_grad_norm=1.0, backend="cpu")
    enabled = fast_step.ENABLED

    def step() -> None:
        fast_step.ENABLED = False
        try:
            opt.step()
        finally:
            fast_step.ENABLED = enabled

    return step


def _torch_step(kind: str, params: list[torch.Tensor]) -> Callable[[], None]:
    opt = torch.optim.AdamW(params, lr=1e-3, **{kind: True})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, SCHED)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        sched.step()

    return step


def time_pipeline(make: Callable[[list[torch.Tensor]], Callable[[], None]], n: int, steps: int) -> list[float]:
    """Seconds per step over ``steps`` timed steps (after 5 warm-up steps), new gradients each step."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(1)) for _ in range(n)]
    step = make(params)
    times = []
    for i in range(steps + 5):
        for p in params:
            p.grad = torch.randn(1)
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        if i >= 5:
            times.append(elapsed)
    return times


def pipelines() -> dict[str, Callable[[list[torch.Tensor]], Callable[[], None]]]:
    out: dict[str, Callable[[list[torch.Tensor]], Callable[[], None]]] = {
        "torch-fused": lambda ps: _torch_step("fused", ps),
        "torch-foreach": lambda ps: _torch_step("foreach", ps),
    }
    for name, status in backends.describe(torch.device("cpu")).items():
        if status == "ok":
            out[f"fusedlr-{name}"] = lambda ps, name=name: _fusedlr_step(name, ps)
            if name == "cpu":
                out["fusedlr-cpu-op-path"] = _fusedlr_op_path_step
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="write host-cost-cpu-<date>.{json,md} here")
    args = parser.parse_args()
    rows = {}
    for name, make in pipelines().items():
        times = sorted(t * 1e6 for t in time_pipeline(make, args.tensors, args.steps))
        rows[name] = {
            "median_us": statistics.median(times),
            "p10_us": times[len(times) // 10],
            "p90_us": times[(9 * len(times)) // 10],
        }
        print(f"{name:16s} {rows[name]['median_us']:10.1f} us/step", flush=True)
    fused = rows["torch-fused"]["median_us"]
    foreach = rows["torch-foreach"]["median_us"]
    for row in rows.values():
        row["speedup_vs_torch_fused"] = fused / row["median_us"]
        row["speedup_vs_torch_foreach"] = foreach / row["median_us"]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "case": f"{args.tensors} one-element fp32 params, CPU, new grads every step, clip 1.0 + cosine schedule",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "triton": triton_version,
        "steps": args.steps,
        "goal_us": GOAL_US,
        "results": rows,
    }
    lines = [
        f"# Host cost: {report['case']}",
        "",
        f"{report['date']}, {report['device']} ({report['cpu_count']} CPUs, load average "
        f"{', '.join(f'{x:.1f}' for x in report['load_average'])}), torch {report['torch']}, triton {triton_version}",
        "",
        "| pipeline | median us/step | p10 | p90 | torch-fused / this | torch-foreach / this |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {r['median_us']:.1f} | {r['p10_us']:.1f} | {r['p90_us']:.1f} | {r['speedup_vs_torch_fused']:.1f}x "
        f"| {r['speedup_vs_torch_foreach']:.1f}x |"
        for name, r in rows.items()
    ]
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"host-cost-cpu-{report['date'][:10]}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
