"""Registers, spills and theoretical occupancy of the Triton kernels, compiled ahead of time (no GPU).

Drives the Triton backend (``tests/triton_aot.py``'s recorder) over the default mode (no low-precision
mode) for float32 and bfloat16 params, with every step switch (clip, AMP unscale, found_inf) off and on,
on aligned buckets and on buckets whose every tensor starts 1 element off a 16-byte boundary, unfolded and
folded (``fusedlr.control.FoldedUpdate``: GradScaler's scale, inf check and step outputs with the switches on;
the epilogue, ``EPILOGUE``, in the bucket's last launch); compiles
each distinct launch for ``--arch`` with the installed triton and reads the cubins
(``tests/machine_code.py``). Occupancy: resident warps per SM / 64 (sm_80/sm_90: 65536 registers,
2048 threads per SM).

    PYTHONPATH=. python benchmarks/triton_resources.py [--arch 90] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import machine_code  # noqa: E402
import triton_aot  # noqa: E402


def _configurations():
    """Default-mode configurations: param dtype x step switches x bucket alignment x folded."""
    for p in (torch.float32, torch.bfloat16):
        for on in (False, True):
            for aligned in (True, False):
                for fold in (False, True):
                    yield {"p": p, "g": p, "kind": None, "n": 2, "aligned": aligned, "clip": on, "scale": on,
                           "inf": on and not fold, "lr": None, "applied": True, "master": False, "sr": False,
                           "moments": None, "amsgrad": False, "maximize": False, "fold": fold}


def measure(arch: int) -> list[dict]:
    """One row per distinct launch: kernel, constexprs of interest, registers, stack, spill instructions,
    resident blocks per SM and occupancy."""
    rows = []
    original = triton_aot._configurations
    triton_aot._configurations = _configurations
    try:
        launches = triton_aot.record_launches()
    finally:
        triton_aot._configurations = original
    with tempfile.TemporaryDirectory() as tmp:
        for la in launches:
            triton_aot.compile_launch(la, arch, Path(tmp))
            (k,) = machine_code.kernels(Path(tmp) / f"{la.name}-{la.key}.sm_{arch}.cubin", f"sm_{arch}")
            c = dict(la.constexprs)
            threads = dict(la.options).get("num_warps", 4) * 32
            blocks = machine_code.occupancy(k, threads)
            rows.append({
                "kernel": la.name,
                "dtype": str(c.get("P_DTYPE", c.get("G_DTYPE"))),
                "switches": "on" if c.get("HAS_INV_SCALE") else "off",
                "folded": str(c.get("FOLDED", c.get("RESET", False))),
                "ALIGNED": str(c.get("ALIGNED", "-")),
                "registers": k.registers,
                "stack": k.stack,
                "spill_instructions": sum(op.startswith(("LDL", "STL")) for _, op, _, _ in k.code),
                "blocks_per_sm": blocks,
                "occupancy": blocks * threads / 2048,
            })
    return sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["switches"], r["ALIGNED"], r["folded"]))


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    head = ("| kernel | dtype | clip/unscale/found_inf | ALIGNED constexpr | folded | registers | stack (B) "
            "| LDL/STL | blocks/SM | occupancy |")
    lines = [head, "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['switches']} | {r['ALIGNED']} | {r['folded']} | "
                     f"{r['registers']} | "
                     f"{r['stack']} | {r['spill_instructions']} | {r['blocks_per_sm']} | {r['occupancy']:.0%} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    import triton

    text = f"sm_{args.arch}, compiled by triton {triton.__version__} (no GPU)\n\n{table(measure(args.arch))}\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
