"""Checks on the machine code (SASS) of compiled CUDA kernels, read with ``cuobjdump``/``nvdisasm``
(shipped with triton's NVIDIA backend, or the CUDA toolkit's): no GPU needed.

*Element loops* are the source loops that hand elements to the threads of a block: a ``for``/``while``
whose header uses ``threadIdx``, ``blockDim`` or a per-thread index (``tid``, ``nthreads``, ``lane``),
found in the kernels' sources; in Triton sources, a ``for ... in range(...)`` whose body works on
blocks of elements (``tl.arange``). A SASS instruction is inside one when its line info (``-lineinfo``,
including the inlining chain) points into one. ``problems`` lists, per kernel: local-memory traffic
(``LDL``/``STL``: spills or stack arrays) inside element loops; fp64 instructions inside element loops
(for kernels whose data are not float64); and, for kernels that should vectorize, element loops
without a 128-bit global load (or, where they store, without a 128-bit global store). Global data
reached through a generic pointer is read with ``LD``/``ST`` rather than ``LDG``/``STG``; both count.
``occupancy`` gives the resident blocks per SM that a kernel's registers and shared memory allow.
``compile_cubins`` builds the project's ``csrc/cuda/*.cu`` as setup.py does (the tests and
benchmarks/cuda_resources.py read the same cubins).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Kernel",
    "compile_cubins",
    "cuda_tool",
    "element_loop_lines",
    "kernels",
    "occupancy",
    "problems",
    "report",
    "setup_value",
]

ROOT = Path(__file__).resolve().parents[1]

_SECTION = re.compile(r"^\.text\.(\S+):\s*$")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_FP64 = re.compile(r"^(DADD|DMUL|DFMA|DSETP|DSET|DMNMX|DMMA)|\.F64|64H")
_GLOBAL_LOAD = re.compile(r"^(LDG|LD)\.")  # LD: generic (global or shared), LDS/LDL/LDC excluded
_GLOBAL_STORE = re.compile(r"^(STG|ST)\.")
_LOOP = re.compile(r"\b(for|while)\s*\(")
_PER_THREAD = re.compile(r"\b(threadIdx|blockDim|tid|nthreads|lane)\b")


def setup_value(arg: str) -> str:
    """What ``python setup.py <arg>`` prints (``--cuda-home``, ``--nvcc-flags``); '' when it fails (no CUDA
    toolkit)."""
    proc = subprocess.run([sys.executable, str(ROOT / "setup.py"), arg], capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def compile_cubins(arch: str) -> tuple[Path, ...]:
    """Each ``csrc/cuda/*.cu`` as a cubin for ``arch`` (e.g. ``sm_90``), built with setup.py's nvcc flags
    (two at a time). Needs ``setup_value("--cuda-home")``; raises RuntimeError with nvcc's command and
    output when a build fails."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    nvcc = f"{setup_value('--cuda-home')}/bin/nvcc"
    out = Path(tempfile.mkdtemp(prefix="fusedlr-cubin-"))
    flags = setup_value("--nvcc-flags").split() + COMMON_NVCC_FLAGS + ["-std=c++17", f"-arch={arch}", "-cubin"]

    def build(source: Path) -> Path:
        cubin = out / f"{source.stem}.{arch}.cubin"
        cmd = [nvcc, *flags, "-I", str(ROOT / "csrc"), str(source), "-o", str(cubin)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr}")
        return cubin

    with ThreadPoolExecutor(2) as pool:
        return tuple(pool.map(build, sorted((ROOT / "csrc" / "cuda").glob("*.cu"))))


def cuda_tool(name: str) -> Path | None:
    """``cuobjdump`` / ``nvdisasm``: from triton's NVIDIA backend, else the CUDA toolkit on PATH.

    Triton is located, not imported: importing it here, at collection, would come before
    tests/test_triton_backend.py sets TRITON_INTERPRET=1.
    """
    spec = importlib.util.find_spec("triton")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "backends" / "nvidia" / "bin" / name
        if path.exists():
            return path
    found = shutil.which(name)
    return Path(found) if found else None


def _tool(name: str) -> str:
    path = cuda_tool(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found (triton's NVIDIA backend or the CUDA toolkit)")
    return str(path)


_PY_LOOP = re.compile(r"^(\s*)for .* in (?:tl\.)?(?:static_)?range\(.*:\s*$")


def _python_element_loop_lines(text: str) -> set[int]:
    """Triton sources: ``for ... in range(...)`` loops whose body works on element blocks (``tl.arange``)."""
    lines = text.splitlines()
    out: set[int] = set()
    for i, line in enumerate(lines):
        m = _PY_LOOP.match(line)
        if not m:
            continue
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > len(m.group(1))):
            j += 1
        if any("tl.arange" in body for body in lines[i:j]):
            out.update(range(i + 1, j + 1))
    return out


def element_loop_lines(source: Path) -> set[int]:
    """The lines of ``source`` inside its element loops (header included)."""
    text = source.read_text()
    if source.suffix == ".py":
        return _python_element_loop_lines(text)
    lines: set[int] = set()
    for m in _LOOP.finditer(text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        if not _PER_THREAD.search(text[m.end() : i]):
            continue
        j = i
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "{":
            depth, j = 1, j + 1
            while depth and j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
        else:
            j = text.find(";", j) + 1
        first, last = text.count("\n", 0, m.start()) + 1, text.count("\n", 0, j) + 1
        lines.update(range(first, last + 1))
    return lines


@dataclass
class Kernel:
    """One kernel: its SASS as (address, opcode, operands, source locations) and its resource usage."""

    name: str
    demangled: str
    code: list[tuple[int, str, str, tuple[tuple[str, int], ...]]] = field(default_factory=list)
    registers: int = 0
    stack: int = 0
    shared: int = 0
    max_threads: int = 0  # __launch_bounds__ / Triton's num_warps * 32 (0: not recorded)

    def in_element_loops(self, loop_lines: dict[str, set[int]]) -> list[tuple[int, str, str]]:
        """Instructions whose source locations (any level of inlining) lie in an element loop."""
        out = []
        for addr, op, args, locs in self.code:
            if any(line in loop_lines.get(Path(f).name, ()) for f, line in locs):
                out.append((addr, op, args))
        return out


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _cubins(binary: Path, arch: str) -> list[Path]:
    if binary.suffix == ".cubin":
        return [binary]
    work = Path(tempfile.mkdtemp(prefix="fusedlr-sass-"))
    subprocess.run([_tool("cuobjdump"), "-xelf", "all", str(binary.resolve())], cwd=work, check=True,
                   capture_output=True)
    return sorted(p for p in work.glob("*.cubin") if f".{arch}." in p.name or p.name.endswith(f"{arch}.cubin"))


def kernels(binary: Path, arch: str = "sm_90") -> list[Kernel]:
    """Every kernel of ``binary``: a cubin, or a shared library embedding cubins (those for ``arch``)."""
    found: dict[str, Kernel] = {}
    for cubin in _cubins(binary, arch):
        sass = subprocess.run([_tool("nvdisasm"), "-c", "-gi", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        current: Kernel | None = None
        locs: list[tuple[str, int]] = []  # the line info of the next instructions
        fresh = False  # whether a new block of line info has started
        for line in sass.splitlines():
            if m := _SECTION.match(line):
                current = found.setdefault(m.group(1), Kernel(m.group(1), m.group(1)))
                locs, fresh = [], False
            elif (m := _LINE.search(line)) and current is not None:
                if not fresh:
                    locs, fresh = [], True
                locs.append((m.group(1), int(m.group(2))))
                if m.group(3):
                    locs.append((m.group(3), int(m.group(4))))
            elif (m := _INSTR.search(line)) and current is not None:
                current.code.append((int(m.group(1), 16), m.group(2), m.group(3).strip(), tuple(locs)))
                fresh = False
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
        for m in _RES.finditer(res):
            if m.group(1) in found:
                k = found[m.group(1)]
                k.registers, k.stack, k.shared = int(m.group(2)), int(m.group(3)), int(m.group(4))
        elf = subprocess.run([_tool("cuobjdump"), "-elf", str(cubin)], capture_output=True, text=True, check=True).stdout
        for name, body in zip(*[iter(re.split(r"^\.nv\.info\.(\S+)\s*$", elf, flags=re.MULTILINE)[1:])] * 2):
            m = re.search(r"EIATTR_MAX_THREADS\s+Format:\s+\S+\s+Value:\s+(\S+) (\S+) (\S+)", body)
            if m and name in found:
                found[name].max_threads = int(m.group(1), 16) * int(m.group(2), 16) * int(m.group(3), 16)
    ks = [k for k in found.values() if k.code]
    for k, d in zip(ks, _demangle([k.name for k in ks])):
        k.demangled = d
    return ks


def problems(k: Kernel, loop_lines: dict[str, set[int]], vectorized: bool, fp64_data: bool) -> list[str]:
    """What is wrong with ``k``'s element loops (empty: nothing). ``vectorized``: 128-bit accesses expected."""
    loop = k.in_element_loops(loop_lines)
    out = []
    local = [f"{a:#06x} {op} {args}" for a, op, args in loop if op.startswith(("LDL", "STL"))]
    if local:
        out.append(f"local memory in an element loop: {local[:4]}")
    if not fp64_data:
        fp64 = [f"{a:#06x} {op}" for a, op, _ in loop if _FP64.search(op)]
        if fp64:
            out.append(f"{len(fp64)} fp64 instructions in element loops: {fp64[:4]}")
    if vectorized:
        loads = sorted({op for _, op, _ in loop if _GLOBAL_LOAD.match(op)})
        if not any(".128" in op for op in loads):
            out.append(f"no 128-bit global load in its element loops (loads: {loads})")
        stores = sorted({op for _, op, _ in loop if _GLOBAL_STORE.match(op)})
        if stores and not any(".128" in op for op in stores):
            out.append(f"no 128-bit global store in its element loops (stores: {stores})")
    return out


def occupancy(k: Kernel, threads: int, shared_per_sm: int = 228 * 1024) -> int:
    """Resident blocks per SM (sm_80/sm_90: 64K registers, 2048 threads, 32 blocks) at ``threads`` per block."""
    warps = (threads + 31) // 32
    per_warp = -(-max(k.registers, 1) * 32 // 256) * 256  # registers are allocated per warp, by 256
    by_regs = 65536 // (per_warp * warps)
    by_threads = 2048 // (warps * 32)
    by_shared = shared_per_sm // (k.shared + 1024) if k.shared else 32  # 1 KiB reserved per block
    return min(by_regs, by_threads, by_shared, 32)


def report(ks: list[Kernel]) -> str:
    """One line per kernel: registers, stack, shared memory and resident blocks per SM at its block size."""
    lines = []
    for k in sorted(ks, key=lambda k: k.demangled):
        threads = k.max_threads or 256
        lines.append(
            f"REG {k.registers:3d} STACK {k.stack:3d} SHARED {k.shared:5d} -> {occupancy(k, threads):2d} blocks/SM"
            f" at {threads:4d} threads{'' if k.max_threads else '?'}: {k.demangled[:120]}"
        )
    return "\n".join(lines)
