"""Every Triton kernel specialization fusedlr can launch, compiled ahead of time for sm_90 and sm_80
with the installed triton (``tests/triton_aot.py``; no GPU), and its machine code checked like the
CUDA kernels' (``tests/machine_code.py``): no local memory in element loops, no fp64 in the element
loops of non-float64 kernels, 128-bit global loads and stores on the aligned fp32 and bf16 paths.
CI runs this file under the newest triton and under the GPU machine's (torch 2.11's triton 3.6).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from machine_code import cuda_tool, element_loop_lines, kernels, problems, report

# triton is not imported here (tests/test_triton_backend.py sets TRITON_INTERPRET=1 before it is imported)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (90, 80)
# Open findings (reported, not waived: any other problem fails; these make the test xfail with details):
# the Triton AdamW kernel has float64 instructions (a DMUL/MUFU.RCP64H/DFMA division sequence) whose line
# info points into the element loop (adamw.py: ``_adamw_block``'s store, inlined at the call inside
# ``for it in range(ITERS_)``), and for some specializations local-memory traffic (STL/LDL.64) there.
# ``_adamw_block`` itself has no float64 math for float32 states: this is the scalar float64 step math
# (``lr_t / bias1`` ...), written before the loop but placed by the compiler at its first use inside
# the fully unrolled loop, which line info cannot tell from per-element code.
KNOWN = re.compile(r"^_adamw_kernel-\S+ .*(fp64 instructions in element loops|local memory in an element loop)")


@functools.cache
def compiled(tmp: str) -> tuple[str, Path]:
    """Runs the AOT compilation in a fresh process (no TRITON_INTERPRET): its log and output folder."""
    out = Path(tmp)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(ROOT / "tests" / "triton_aot.py"), str(out), *map(str, ARCHS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    return proc.stdout, out


@pytest.fixture(scope="module")
def aot(tmp_path_factory) -> tuple[str, Path]:
    return compiled(str(tmp_path_factory.mktemp("triton-aot")))


def test_every_launch_compiles_for_every_arch(aot) -> None:
    log, out = aot
    print(log)
    assert "coverage gaps: none" in log, log
    specs = sorted(out.glob("*.json"))
    assert len(specs) > 10, log
    for spec in specs:
        for arch in ARCHS:
            assert (out / f"{spec.stem}.sm_{arch}.cubin").stat().st_size > 0
    kinds = {json.loads(s.read_text())["constexprs"].get("SCHED_KIND") for s in specs} - {None}
    from fusedlr.schedules import Kind

    assert len(kinds) >= len(Kind), f"schedule kinds compiled: {sorted(kinds)}"


@pytest.mark.skipif(cuda_tool("nvdisasm") is None, reason="nvdisasm not found (triton's NVIDIA backend)")
@pytest.mark.parametrize("arch", ARCHS)
def test_triton_machine_code(aot, arch) -> None:
    _, out = aot
    loop_lines = {p.name: element_loop_lines(p) for p in (ROOT / "fusedlr" / "triton").glob("*.py")}
    found, ks = [], []
    for spec in sorted(out.glob("*.json")):
        constexprs = json.loads(spec.read_text())["constexprs"]
        dtype = constexprs.get("P_DTYPE", constexprs.get("G_DTYPE", ""))
        (k,) = kernels(out / f"{spec.stem}.sm_{arch}.cubin", f"sm_{arch}")
        k.demangled = f"{spec.stem} {dtype} aligned={constexprs.get('ALIGNED')}"
        ks.append(k)
        vectorized = constexprs.get("ALIGNED") == "True" and dtype in ("fp32", "bf16")
        found += [f"{k.demangled}: {p}" for p in problems(k, loop_lines, vectorized, fp64_data=dtype == "fp64")]
    print(f"\nsm_{arch}:\n{report(ks)}")
    known = [f for f in found if KNOWN.search(f)]
    assert not [f for f in found if f not in known], "\n".join(found)
    if known:
        pytest.xfail(f"{len(known)} known findings (see KNOWN), e.g. " + "; ".join(known[:3]))
