"""The run's record: environment metadata, derived metrics, targets, and the JSON / Markdown / PNG writers."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

import fusedlr

from .cases import fused_bytes_per_param

__all__ = [
    "NOTES",
    "TARGETS",
    "collect_meta",
    "derive",
    "device_slug",
    "evaluate_targets",
    "write_json",
    "write_markdown",
    "write_plot",
]

ROOT = Path(__file__).resolve().parents[1]

#: (case, metric, goal, comparison) reported against, never asserted. Metrics: see ``evaluate_targets``.
TARGETS: list[dict[str, Any]] = [
    {"case": "gpt-1.3b-fp32", "metric": "x_floor", "goal": 1.15, "cmp": "<=",
     "what": "1.3B fp32: best fusedlr AMP step / bandwidth floor"},
    {"case": "gpt-1.3b-fp32", "metric": "vs_torch_fused", "goal": 1.5, "cmp": ">=",
     "what": "1.3B fp32: torch fused pipeline / best fusedlr AMP step"},
    {"case": "2000x4096-fp32", "metric": "vs_torch_fused", "goal": 20.0, "cmp": ">=",
     "what": "2000 x 4096 fp32: torch fused pipeline / best fusedlr AMP step"},
]

NOTES: list[str] = [
    (
        "One step = AMP unscale + inf check + global grad-norm clip (max_norm 1.0) + warmup-cosine LR + AdamW "
        "(betas 0.9/0.95, weight decay 0.1, lr 1e-5) over every tensor of the case. Grads are preallocated once "
        "(N(0,1) x GradScaler scale 2^16) and re-assigned before each step, untimed (torch pipelines unscale and "
        "clip them in place, so their private copy is restored first); no backward runs."
    ),
    (
        "Time: median over the timed steps of CUDA-event time (perf_counter on CPU); the device is synchronized "
        "before each step, so launch overhead and host syncs count. Warm-up steps come first (states allocated)."
    ),
    (
        "Bytes: what the fused step must move, per parameter: fp32 params/grads 32 B (reduction pass: read g 4; "
        "update pass: read p,g,m,v 16 + write p,m,v 12); bf16 params/grads with fp32 states 24 B "
        "(read g 2; read p 2, g 2, m 4, v 4; write p 2, m 4, v 4). GB/s = those bytes / time for every row "
        "(torch rows included, as 'effective' bandwidth); % copy BW relative to a measured device-to-device copy "
        "(read + write bytes); x floor = time / (bytes / copy bandwidth)."
    ),
    (
        "Precision-mode cases (<shapes>-bf16-<mode>, `--cases modes`): the fusedlr rows run with master_weights / "
        "stochastic_rounding / state_dtype; bytes and floor follow what the mode must move (master 30 B/param, "
        "remainder 28, sr 24, sr-bf16-states 16; see cases.py), each fusedlr row in its backend's own kernels; the torch rows are the "
        "same default-mode pipelines as in the bf16 case."
    ),
    (
        "torch.optim.AdamW keeps exp_avg/exp_avg_sq in the param dtype: with bf16 params the torch rows move "
        "fewer bytes (bf16 states) than fusedlr, which keeps fp32 states."
    ),
    (
        "*-noamp: fusedlr.AdamW.step() eagerly without a GradScaler (clipping + schedule, grads left scaled; the "
        "clip normalises them). *-graph: that same step captured in a CUDA graph and replayed. "
        "scaler.step(opt); scaler.update() cannot be captured, hence no GradScaler in the graph rows."
    ),
    (
        "Peak extra memory: torch.cuda.max_memory_allocated during one step minus memory_allocated before it "
        "(after warm-up). A graph's workspace lives in its private pool, allocated at capture, so it shows 0."
    ),
    (
        "check: each pipeline's params after 4 steps from the same init, with grads varied between steps "
        "(sign and relative size), lr 1e-2, eps ~ a third of a clipped grad, a schedule that warms up and decays, "
        "against fusedlr's reference backend with a GradScaler; also the pre-clip gradient norm. max|diff| is the "
        "largest absolute parameter difference (tolerance: fp32 1e-6 + 1e-5|p|; bf16 3e-4 + |p|/64, a few bf16 "
        "ulps, as torch keeps bf16 states)."
    ),
]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def device_slug(device_name: str) -> str:
    """A file-name-safe device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"


def collect_meta(device: torch.device) -> dict[str, Any]:
    """Device, versions, date and git commit of this run."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        extra = {"total_memory_gib": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count,
                 "capability": f"{props.major}.{props.minor}", "driver": _driver()}
    else:
        name = f"cpu {platform.processor() or platform.machine()}".strip()
        extra = {"threads": torch.get_num_threads()}
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain")
    return {
        "device": name,
        "device_type": device.type,
        **extra,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "fusedlr": fusedlr.__version__,
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def derive(case_entry: dict[str, Any], copy_bps: float) -> None:
    """Add GB/s, % of copy bandwidth, x floor and the torch-to-this time ratios to each measured row."""
    rows = {r["pipeline"]: r for r in case_entry["results"] if r.get("median_ms") is not None}
    floor_ms = case_entry["fused_bytes"] / copy_bps * 1e3
    case_entry["floor_ms"] = floor_ms
    for r in rows.values():
        t = r["median_ms"]
        r["gbps"] = case_entry["fused_bytes"] / (t * 1e-3) / 1e9
        r["pct_copy_bw"] = 100.0 * floor_ms / t
        r["x_floor"] = t / floor_ms
        for ref in ("torch-foreach", "torch-fused"):
            key = "vs_" + ref.replace("-", "_")
            r[key] = rows[ref]["median_ms"] / t if ref in rows else None


def _best_fusedlr(case_entry: dict[str, Any]) -> dict[str, Any] | None:
    rows = [r for r in case_entry["results"]
            if r["family"] == "fusedlr" and r["mode"] == "amp" and r.get("median_ms") is not None]
    return min(rows, key=lambda r: r["median_ms"]) if rows else None


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value of the best fusedlr AMP pipeline, and whether it is met."""
    by_name = {c["name"]: c for c in report["cases"]}
    out = []
    for target in TARGETS:
        entry = {k: target[k] for k in ("what", "case", "metric", "goal", "cmp")}
        case = by_name.get(target["case"])
        best = _best_fusedlr(case) if case else None
        value = best.get(target["metric"]) if best else None
        entry["pipeline"] = best["pipeline"] if best else None
        entry["value"] = value
        if value is None:
            entry["met"] = None
        else:
            entry["met"] = value <= target["goal"] if target["cmp"] == "<=" else value >= target["goal"]
        out.append(entry)
    return out


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _f(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if value < 10 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """The human-readable table of ``report``."""
    m = report["meta"]
    bw = report["copy_bandwidth"]
    lines = [
        f"# fusedlr optimizer step: {m['device']}, {m['date'][:10]}",
        "",
        f"torch {m['torch']} (CUDA {m['cuda']}), triton {m['triton']}, python {m['python']}, fusedlr {m['fusedlr']} "
        f"at commit `{(m['git_commit'] or 'unknown')[:12]}`{' (dirty tree)' if m['git_dirty'] else ''}"
        + (f", driver {m['driver']}" if m.get("driver") else ""),
        f"Measured copy bandwidth: {bw['gbps']:.0f} GB/s (read + write, {bw['buffer_bytes'] / 2**20:.0f} MiB copy). "
        f"Run: `{report['command']}`" + (" (quick)" if report["settings"]["quick"] else ""),
        "",
        "## Targets (reported, not asserted)",
        "",
        "| target | best fusedlr pipeline | value | goal | met |",
        "|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        met = "n/a" if t["met"] is None else "yes" if t["met"] else "**no**"
        lines.append(f"| {t['what']} | {t['pipeline'] or ''} | {_f(t['value'], '.2f')} | {t['cmp']} {t['goal']} | {met} |")
    if m["device_type"] != "cuda" or "H100" not in m["device"]:
        lines += ["", "The targets are defined for an H100; this device is not one."]
    for case in report["cases"]:
        per = case.get("bytes_per_param") or fused_bytes_per_param(
            {"fp32": torch.float32, "bf16": torch.bfloat16}[case["dtype"]]
        )
        mode = f"; fusedlr mode {case['options']}" if case.get("mode") else ""
        state = case.get("state_bytes_per_param")
        lines += [
            "",
            f"## {case['name']}",
            "",
            f"{case['num_tensors']} tensors, {case['num_params'] / 1e6:.1f}M params, {case['dtype']} params and grads{mode}; "
            f"the fused step moves {case['fused_bytes'] / 1e9:.2f} GB ({per} B/param)"
            + (f", fusedlr keeps {state} B/param of optimizer state" if state is not None else "")
            + (f", bandwidth floor {_ms(case.get('floor_ms'))} ms." if case.get("floor_ms") else "."),
        ]
        if case["status"] != "ok":
            lines += ["", f"Skipped: {case['status']}"]
            continue
        lines += [
            "",
            (
                "| pipeline | ms/step | p10-p90 ms | n | GB/s | % copy BW | x floor | foreach / this | fused / this "
                "| peak extra MiB | states | check max\\|diff\\| | status |"
            ),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
        ]
        for r in case["results"]:
            chk = r.get("check")
            check = "" if not chk else ("ref" if chk.get("reference") else
                                        f"{chk['max_abs_diff']:.1e} {'ok' if chk['agree'] else '**FAIL**'}")
            p = "" if r.get("median_ms") is None else f"{_ms(r['p10_ms'])}-{_ms(r['p90_ms'])}"
            mib = "" if r.get("peak_extra_bytes") is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
            lines.append(
                f"| {r['pipeline']} | {_ms(r.get('median_ms'))} | {p} | {r.get('iters', '')} | {_f(r.get('gbps'), '.0f')} "
                f"| {_f(r.get('pct_copy_bw'), '.0f')} | {_f(r.get('x_floor'), '.2f')} | {_f(r.get('vs_torch_foreach'), '.2f')} "
                f"| {_f(r.get('vs_torch_fused'), '.2f')} | {mib} | {r.get('state_dtype', '')} | {check} "
                f"| {r['status'] if r['status'] == 'ok' else r['status'][:120]} |"
            )
    lines += ["", "## Notes", ""] + [f"- {n}" for n in NOTES]
    lines += ["", "Pipelines:", ""] + [f"- `{name}`: {d}" for name, d in report["pipelines"].items()]
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: dict[str, Any], path: Path) -> str | None:
    """A two-panel PNG (speedup over torch's fused pipeline; % of copy bandwidth); None, or why it was not written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        return f"matplotlib is not installed ({err})"
    cases = [c for c in report["cases"] if c["status"] == "ok"]
    names = [r["pipeline"] for c in cases for r in c["results"] if r["mode"] == "amp" and r.get("median_ms")]
    pipelines = list(dict.fromkeys(names))
    if not cases or not pipelines:
        return "nothing was measured"
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.6 * len(cases)), 8), sharex=True)
    width = 0.8 / len(pipelines)
    for i, name in enumerate(pipelines):
        xs, speed, pct = [], [], []
        for j, c in enumerate(cases):
            row = next((r for r in c["results"] if r["pipeline"] == name and r.get("median_ms")), None)
            if row is not None:
                xs.append(j + (i - (len(pipelines) - 1) / 2) * width)
                speed.append(row.get("vs_torch_fused") or float("nan"))
                pct.append(row["pct_copy_bw"])
        axes[0].bar(xs, speed, width, label=name)
        axes[1].bar(xs, pct, width, label=name)
    axes[0].set_yscale("log")
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("speedup over torch fused pipeline (x)")
    axes[1].set_ylabel("% of measured copy bandwidth")
    axes[1].axhline(100.0, color="k", lw=0.8)
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels([c["name"] for c in cases], rotation=20, ha="right")
    axes[0].legend(fontsize=8, ncol=min(5, len(pipelines)))
    m = report["meta"]
    title = f"fusedlr AdamW step (AMP unscale + clip + LR schedule), {m['device']}, torch {m['torch']}"
    axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
