"""Registers, spills, shared memory and theoretical occupancy of the fusedlr CUDA kernels, read from the
machine code (no GPU needed): every ``csrc/cuda/*.cu`` is compiled to a cubin with nvcc and setup.py's
flags, and ``cuobjdump -res-usage`` / the SASS are read with tests/machine_code.py.

Occupancy follows sm_80/sm_90's limits (65536 registers, 2048 threads and 32 blocks per SM; registers
allocated per warp in units of 256; 1 KiB of shared memory reserved per block): resident blocks per SM
at the kernel's block size, and the warps they give as a share of the SM's 64.

    python benchmarks/cuda_resources.py            # sm_90, the kernels of pass 1 and pass 2, a Markdown table
    python benchmarks/cuda_resources.py --all      # every kernel instance (the low-precision modes too)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from machine_code import Kernel, compile_cubins, kernels, occupancy, setup_value  # noqa: E402

MAX_WARPS_PER_SM = 64
_NAME = re.compile(r"(grad_stats_kernel|adamw_kernel)<[^()]*>")


def nvcc_version() -> str:
    """nvcc's release line, e.g. 'Cuda compilation tools, release 13.0, V13.0.88'."""
    out = subprocess.run([f"{setup_value('--cuda-home')}/bin/nvcc", "--version"], capture_output=True, text=True,
                         check=True).stdout
    return next((line for line in out.splitlines() if "release" in line), out.strip())


def spilled(k: Kernel) -> int:
    """Local-memory instructions (LDL/STL) anywhere in ``k``: spills or stack arrays."""
    return sum(op.startswith(("LDL", "STL")) for _, op, _, _ in k.code)


def table(ks: list[Kernel], everything: bool) -> str:
    """A Markdown table, one row per kernel instance (the default update's of pass 2 only, single-bucket and
    launch-set instances, unless ``everything``)."""
    rows = ["| kernel | regs | stack B | LDL/STL | shared B | threads | blocks/SM | occupancy |", "|---|---|---|---|---|---|---|---|"]
    for k in sorted(ks, key=lambda k: k.demangled):
        m = _NAME.search(k.demangled)
        if m is None:
            continue
        name = m.group(0)
        # adamw_kernel<T, M, AMSGRAD, LOWP, SET>: the default update is LOWP false (single bucket and launch set)
        if name.startswith("adamw_kernel") and not everything and name.split(",")[3].strip() != "false":
            continue
        threads = k.max_threads or 256
        blocks = occupancy(k, threads)
        warps = blocks * ((threads + 31) // 32)
        rows.append(f"| `{name}` | {k.registers} | {k.stack} | {spilled(k)} | {k.shared} | {threads} | {blocks} |"
                    f" {100 * warps // MAX_WARPS_PER_SM}% |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--all", action="store_true", help="every instance of pass 2 (low-precision modes too)")
    args = parser.parse_args()
    ks = [k for cubin in compile_cubins(args.arch) for k in kernels(cubin, args.arch)]
    print(f"{args.arch}, {nvcc_version()}, flags: {setup_value('--nvcc-flags')}\n")
    print(table(ks, args.all))


if __name__ == "__main__":
    main()
