"""Pipelines timed step by step in turn (A, B, A, B, ...), for ratios that hold on a busy machine.

``benchmarks/run.py`` times each pipeline in one block, so a load change between blocks shifts their ratio;
here every round steps each pipeline once, and the ratio of each pair is taken round by round. Used for the
reference backend against torch's foreach recipe (issue 8 item 6). Not a test: nothing is asserted.

    python benchmarks/interleaved.py --device cpu --case gpt2-124m-fp32 --rounds 15 \\
        --pipelines torch-foreach,torch-fused,fusedlr-torch
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from benchmarks.cases import make_grads, select_cases
from benchmarks.pipelines import Hyper, build_pipeline, pipeline_specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--case", default="gpt2-124m-fp32", help="one case name of benchmarks/cases.py")
    ap.add_argument("--pipelines", default="torch-foreach,torch-fused,fusedlr-torch", help="comma list of names")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds (after 2 warm-up rounds)")
    args = ap.parse_args()

    device = torch.device(args.device)
    (case,) = select_cases(args.case, [])
    hyper = Hyper()
    grads = make_grads(case, device, hyper.init_scale)
    wanted = args.pipelines.split(",")
    specs = {s.name: s for s, reason in pipeline_specs(device) if reason is None}
    missing = [name for name in wanted if name not in specs]
    if missing:
        raise SystemExit(f"--pipelines: {missing} cannot run on {device}; choose among {sorted(specs)}")
    pipes = {name: build_pipeline(specs[name], case, device, hyper, grads) for name in wanted}
    times: dict[str, list[float]] = {name: [] for name in wanted}
    for r in range(args.rounds + 2):
        for name, pipe in pipes.items():
            pipe.prepare()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            pipe.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r >= 2:
                times[name].append(time.perf_counter() - start)

    base = wanted[0]
    print(f"# {case.name}: {len(case.shapes)} tensors, {case.num_params / 1e6:.1f}M params, {device}")
    print(f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, {platform.machine()} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}, {args.rounds} interleaved rounds\n")
    print(f"| pipeline | median ms | min ms | {base} / this, median of per-round ratios | range of the ratio |")
    print("|---|---:|---:|---:|---|")
    for name, ts in times.items():
        ratios = sorted(b / t for b, t in zip(times[base], ts))
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {min(ts) * 1e3:.1f} | {statistics.median(ratios):.2f} "
              f"| {ratios[0]:.2f}-{ratios[-1]:.2f} |")


if __name__ == "__main__":
    main()
