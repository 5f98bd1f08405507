"""Benchmark one full optimizer step, every fusedlr backend against torch's recipe; write JSON, Markdown, PNG.

    python benchmarks/run.py --out DIR                      # all GPU cases on cuda (< 6 min on an H100)
    python benchmarks/run.py --device cpu --quick           # tiny CPU cases, results in a temp dir
    python benchmarks/run.py --cases gpt-1.3b,2000x4096-fp32 --quick

Files: ``<out>/<device>-<date>.json``, ``.md`` and ``.png`` (default out: benchmarks/results on CUDA, a new
temporary directory on CPU, whose numbers are no real results).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import cases as C
from benchmarks import pipelines as P
from benchmarks import report as R
from benchmarks import timing as T
from fusedlr import backends

CHECK_STEPS = 4
#: Agreement tolerance per param dtype: |diff| <= atol + rtol * |reference|. The check moves params by ~2e-2;
#: bf16: every step rounds the params to bf16 (ulp 1.2e-4 at |p| = 0.02) and torch keeps bf16 states and
#: applies weight decay in its own bf16 rounding, so a few ulps (~1.5% of the displacement) are allowed.
CHECK_TOL = {"fp32": (1e-6, 1e-5), "bf16": (3e-4, 2.0**-6)}
CHECK_NORM_RTOL = {"fp32": 1e-4, "bf16": 1e-2}


def _log(msg: str) -> None:
    print(msg, flush=True)


def _check_steps(pipe: P.Pipeline, grads: list[torch.Tensor], n: int = CHECK_STEPS) -> None:
    """``n`` steps whose grads differ: before step k every other tensor's grad (from k % 2) is multiplied by -4
    in place, and restored exactly after it. With the same grads every step, Adam's bias-corrected moments
    equal g and g^2 whatever the betas; varying sign and relative size (clipping cancels a global scale)
    makes betas, moments and the clip coefficient all show in the result."""
    for k in range(n):
        varied = grads[k % 2 :: 2]
        torch._foreach_mul_(varied, -4.0)
        try:
            pipe.prepare()
            pipe.step()
        finally:
            torch._foreach_mul_(varied, -0.25)


@torch.no_grad()
def _compare(params: list[torch.Tensor], ref: list[torch.Tensor], atol: float, rtol: float) -> tuple[float, bool]:
    """(max |diff|, every element within atol + rtol * |ref|)."""
    worst, ok = 0.0, True
    for p, r in zip(params, ref):
        diff = (p.float() - r.float()).abs()
        worst = max(worst, float(diff.max()))
        ok = ok and bool((diff <= atol + rtol * r.float().abs()).all())
    return worst, ok


def check_case(case: C.Case, device: torch.device, specs: list[P.PipelineSpec], grads: list[torch.Tensor],
               deadline: float) -> dict[str, dict[str, Any]]:
    """Run every pipeline ``CHECK_STEPS`` steps from the same params and compare with the reference pipeline."""
    hyper = P.check_hyper(case)
    atol, rtol = CHECK_TOL[case.dtype_name]
    ref = P.build_pipeline(P.REFERENCE, case, device, hyper, grads)
    _check_steps(ref, grads)
    ref_params = [p.detach().clone() for p in ref.params]
    ref_norm = ref.grad_norm()
    del ref
    init = C.make_params(case, device)
    moved, _ = _compare(ref_params, init, 0.0, 0.0)
    del init
    T.release(device)
    out: dict[str, dict[str, Any]] = {
        P.REFERENCE.name: {"reference": True, "max_abs_diff": 0.0, "agree": True, "ref_displacement": moved,
                           "grad_norm": ref_norm, "atol": atol, "rtol": rtol}
    }
    for spec in specs:
        if spec == P.REFERENCE or time.monotonic() > deadline:
            continue
        try:
            pipe = P.build_pipeline(spec, case, device, hyper, grads)
            _check_steps(pipe, grads)
            worst, ok = _compare(pipe.params, ref_params, atol, rtol)
            norm = pipe.grad_norm()
            norm_rel = abs(norm - ref_norm) / ref_norm
            out[spec.name] = {"max_abs_diff": worst, "params_close": ok, "grad_norm": norm,
                              "grad_norm_rel_diff": norm_rel,
                              "agree": ok and norm_rel <= CHECK_NORM_RTOL[case.dtype_name]}
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            out[spec.name] = {"error": f"{type(err).__name__}: {err}", "agree": False, "max_abs_diff": float("nan")}
        finally:
            pipe = None  # type: ignore[assignment]
            T.release(device)
    return out


def run_case(case: C.Case, device: torch.device, specs: list[tuple[P.PipelineSpec, str | None]],
             args: argparse.Namespace, copy_bps: float, deadline: float) -> dict[str, Any]:
    """Measure every pipeline on ``case``: the case's entry of the report."""
    entry: dict[str, Any] = {
        "name": case.name, "shape_set": case.shape_set, "dtype": case.dtype_name, "num_tensors": case.num_tensors,
        "num_params": case.num_params, "fused_bytes": case.fused_bytes,
        "mode": case.mode, "options": {k: str(v) for k, v in case.options.items()},
        "bytes_per_param": C.fused_bytes_per_param(case.dtype, mode=case.mode),
        "state_bytes_per_param": case.state_bytes_per_param, "status": "ok", "results": [],
    }
    entry["floor_ms"] = case.fused_bytes / copy_bps * 1e3
    skip = T.fit_reason(case.memory_needed(), device)
    if skip is None and time.monotonic() > deadline:
        skip = "time limit reached"
    if skip is not None:
        entry["status"] = f"skipped: {skip}"
        _log(f"[{case.name}] skipped: {skip}")
        return entry
    hyper = P.BENCH_HYPER
    grads = C.make_grads(case, device, hyper.init_scale)
    runnable = [s for s, reason in specs if reason is None]
    checks: dict[str, dict[str, Any]] = {}
    if args.check:
        try:
            checks = check_case(case, device, runnable, grads, deadline)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory for the reference: time the case anyway
            entry["check_error"] = f"{type(err).__name__}: {err}"
            _log(f"[{case.name}] agreement check failed: {entry['check_error']}")
            T.release(device)
    for spec, reason in specs:
        row: dict[str, Any] = {"pipeline": spec.name, "family": spec.family, "impl": spec.impl, "mode": spec.mode}
        entry["results"].append(row)
        if spec.name in checks:
            row["check"] = checks[spec.name]
        if reason is not None:
            row["status"] = f"skipped: {reason}"
            continue
        if time.monotonic() > deadline:
            row["status"] = "skipped: time limit reached"
            continue
        pipe = None
        try:
            pipe = P.build_pipeline(spec, case, device, hyper, grads)
            timing = T.measure(pipe.step, device, prepare=pipe.prepare, warmup=args.warmup, iters=args.iters,
                               budget_s=args.budget_s, min_iters=3 if args.quick else 5)
            row.update(
                status="ok", median_ms=timing.median_ms, p10_ms=timing.quantile_ms(0.1),
                p90_ms=timing.quantile_ms(0.9), iters=len(timing.times_ms),
                peak_extra_bytes=T.peak_extra_bytes(pipe.step, device, pipe.prepare),
                state_dtype=str(pipe.state_dtype).replace("torch.", ""),
            )
            _log(f"[{case.name}] {spec.name:28s} {timing.median_ms:10.3f} ms  (n={len(timing.times_ms)})")
        except torch.cuda.OutOfMemoryError as err:
            row["status"] = f"skipped: out of memory ({str(err).splitlines()[0][:200]})"
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            row["status"] = f"error: {type(err).__name__}: {err}"
            _log(f"[{case.name}] {spec.name}: {row['status']}")
        finally:
            pipe = None
            T.release(device)
    del grads
    T.release(device)
    R.derive(entry, copy_bps)
    return entry


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=default_device)
    ap.add_argument("--cases", default="",
                    help="comma list of cases or shape sets (" + ", ".join(list(C.ALL_CASES) + list(C.SHAPE_SETS))
                    + ", all); default: the GPU cases on cuda, the tiny ones on cpu")
    ap.add_argument("--pipelines", default="", help="comma list of substrings: run only matching pipelines")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (10 timed (at least 3), 2 warm-up, 0.5 s/pipeline)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per pipeline (default 50, quick 10)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per pipeline (default 5, quick 2)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="cap the timed steps of a pipeline to about this many seconds (default 2, quick 0.5)")
    ap.add_argument("--time-limit-s", type=float, default=320.0,
                    help="skip what would start after this many seconds (default 320)")
    ap.add_argument("--out", default=None, help="output directory (default: benchmarks/results on cuda, a temp dir on cpu)")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the agreement check")
    ap.add_argument("--no-plot", dest="plot", action="store_false", help="do not write the PNG")
    args = ap.parse_args(argv)
    args.iters = args.iters or (10 if args.quick else 50)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.budget_s = args.budget_s if args.budget_s is not None else (0.5 if args.quick else 2.0)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the files, and return the report (also the ``paths`` written)."""
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.time_limit_s
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu)")
    selected = C.select_cases(args.cases, C.GPU_CASES if device.type == "cuda" else C.CPU_CASES)
    specs = P.pipeline_specs(device)
    if args.pipelines:
        keys = [k.strip() for k in args.pipelines.split(",") if k.strip()]
        specs = [(s, r) for s, r in specs if s == P.REFERENCE or any(k in s.name for k in keys)]
    meta = R.collect_meta(device)
    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results" if device.type == "cuda"
        else Path(tempfile.mkdtemp(prefix="fusedlr-bench-")))
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{R.device_slug(meta['device'])}-{meta['date'][:10]}"
    _log(f"fusedlr benchmark on {meta['device']}: torch {meta['torch']}, CUDA {meta['cuda']}, triton {meta['triton']}")
    copy_bps, copy_n = T.copy_bandwidth(device)
    _log(f"copy bandwidth {copy_bps / 1e9:.0f} GB/s (read + write)")
    command = argv if argv is not None else sys.argv[1:]
    report: dict[str, Any] = {
        "meta": meta,
        "command": "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in command),
        "settings": {"quick": args.quick, "iters": args.iters, "warmup": args.warmup, "budget_s": args.budget_s,
                     "check": args.check, "check_steps": CHECK_STEPS, "hyper": P.BENCH_HYPER.__dict__},
        "copy_bandwidth": {"bytes_per_s": copy_bps, "gbps": copy_bps / 1e9, "buffer_bytes": copy_n},
        "backends": backends.describe(device),
        "pipelines": {s.name: s.description for s, _ in specs},
        "cases": [],
    }
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    for case in selected:
        report["cases"].append(run_case(case, device, specs, args, copy_bps, deadline))
        _write(report, paths, start)  # after every case: a crash later keeps what was measured
    if args.plot:
        why = R.write_plot(report, out / f"{stem}.png")
        if why is None:
            paths["png"] = out / f"{stem}.png"
        else:
            report["plot"] = f"not written: {why}"
    _write(report, paths, start)
    _log(f"done in {report['elapsed_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return report


def _write(report: dict[str, Any], paths: dict[str, Path], start: float) -> None:
    """(Re)write the JSON and Markdown files of ``report`` with its targets and elapsed time brought up to date."""
    report["targets"] = R.evaluate_targets(report)
    report["elapsed_s"] = time.monotonic() - start
    report["paths"] = {k: str(v) for k, v in paths.items()}
    R.write_json(report, paths["json"])
    R.write_markdown(report, paths["md"])


if __name__ == "__main__":
    main()
