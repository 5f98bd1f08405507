"""The machine code of the CUDA kernels as shipped: ``-O3`` (setup.py's nvcc flags) for sm_90 and
sm_80, checked without a GPU (tests/machine_code.py): no local memory and no fp64 instruction inside
element loops, 128-bit global loads and stores on the aligned fp32 and bf16 paths. Every kernel of
the binary is checked (whatever their names); the registers and resident blocks per SM of each are
printed (``pytest -s``).

With a CUDA build of ``fusedlr._C`` installed, its own cubins are checked; otherwise every
``csrc/cuda/*.cu`` is compiled to a cubin with nvcc and the same flags.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import pytest

from fusedlr import extension

from machine_code import compile_cubins, cuda_tool, element_loop_lines, kernels, problems, report, setup_value

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc").rglob("*.cu*")) + sorted((ROOT / "csrc").rglob("*.h"))


@functools.cache
def binaries(arch: str) -> tuple[Path, ...]:
    """What ships for ``arch``: the installed CUDA build's library when it holds ``arch``, else cubins built
    like setup.py builds."""
    if extension.has_kernel("cuda") and int(arch[3:]) * 10 in tuple(getattr(extension._C, "CUDA_ARCHS", ())):
        return (Path(extension._C.__file__),)
    if not setup_value("--cuda-home"):
        pytest.skip("no CUDA toolkit (nvcc) found")
    return compile_cubins(arch)


def _element_type(demangled: str) -> str:
    """The first template argument of a kernel (its element type), or ""."""
    m = re.search(r"<\s*([\w:]+)", demangled)
    return m.group(1) if m else ""


@pytest.mark.skipif(cuda_tool("nvdisasm") is None, reason="nvdisasm not found (triton's NVIDIA backend)")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_kernels_machine_code(arch: str) -> None:
    loop_lines = {p.name: element_loop_lines(p) for p in SOURCES}
    assert any(loop_lines.values()), "no element loop found in the CUDA sources"
    ks = [k for b in binaries(arch) for k in kernels(b, arch)]
    assert ks, f"no kernel in {binaries(arch)}"
    print(f"\n{arch}:\n{report(ks)}")
    found = []
    for k in ks:
        elem = _element_type(k.demangled)
        found += [
            f"{k.demangled}: {p}"
            for p in problems(
                k,
                loop_lines,
                vectorized=elem in ("float", "__nv_bfloat16"),
                fp64_data="double" in k.demangled,
            )
        ]
    vectorized = [k for k in ks if _element_type(k.demangled) in ("float", "__nv_bfloat16")]
    assert vectorized, "no fp32/bf16 kernel found: the 128-bit checks checked nothing"
    assert not found, "\n".join(found)


BAD = r"""
// An element loop that does its math in double and reads one float at a time.
__global__ void __launch_bounds__(256) scale_in_double(float* x, int n, double f) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = static_cast<float>(x[i] * f);
}
"""


@pytest.mark.skipif(cuda_tool("nvdisasm") is None, reason="nvdisasm not found (triton's NVIDIA backend)")
def test_checks_catch_a_bad_kernel(tmp_path) -> None:
    cuda_home = setup_value("--cuda-home")
    if not cuda_home:
        pytest.skip("no CUDA toolkit (nvcc) found")
    source = tmp_path / "bad.cu"
    source.write_text(BAD)
    cubin = tmp_path / "bad.cubin"
    cmd = [f"{cuda_home}/bin/nvcc", *setup_value("--nvcc-flags").split(), "-arch=sm_90", "-cubin", str(source), "-o",
           str(cubin)]
    subprocess.run(cmd, check=True, capture_output=True)
    (k,) = kernels(cubin)
    assert k.max_threads == 256
    found = problems(k, {"bad.cu": element_loop_lines(source)}, vectorized=True, fp64_data=False)
    assert any("fp64" in p for p in found), found
    assert any("no 128-bit global load" in p for p in found), found
    assert any("no 128-bit global store" in p for p in found), found
