"""CUDA kernels executed on the CPU, for tests without a GPU (csrc/cuda/testing/cuda_shim.h).

``build_library`` compiles ``.cu`` files with g++ for the host: the launch syntax
``kernel<<<grid, block, smem, stream>>>(args)`` is rewritten into ``cudashim::Launch(...).run(kernel, args)``
and each ``__shared__`` declaration into a registered static (``rewrite_cuda``); ``cuda_shim.h`` (force-included) supplies thread/block indices, ``__shared__``, barriers, warp
ops and atomics. The kernels then run with a real grid over CPU memory, every CUDA thread a fiber,
switched in a random order chosen by ``seed``.

``EmulatedCudaBackend`` is the fusedlr backend interface over the kernels of csrc/cuda (launched by
their own host launchers through csrc/cuda/testing/kernels_on_host.cpp): the Python half of the
launch glue, the only place besides that file that knows the launchers' arguments.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fusedlr.extension._common import dtype_runs, launch_key, same_layout

__all__ = [
    "EmulatedCudaBackend",
    "ShimLibrary",
    "build_library",
    "cuda_include",
    "fusedlr_kernels",
    "kernel_barrier_sites",
    "rewrite_cuda",
]

ROOT = Path(__file__).resolve().parents[1]
SHIM_DIR = ROOT / "csrc" / "cuda" / "testing"
KERNEL_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

_SHARED = re.compile(r"\b__shared__\s+([^;{}()=]*?)\s*\b(\w+)\s*((?:\[[^\]]*\]\s*)*);")
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:\s*<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(", re.DOTALL)


# -O2 as shipped code would be; -fno-ipa-reference: a __shared__ static may change across any shim call;
# -Bsymbolic: the kernels call the shim's cudaGetLastError & co., never the real CUDA runtime's, which a CUDA
# build of torch has already loaded into the global namespace (there, without a driver, they return 35).
_FLAGS = [
    "-std=c++17", "-O2", "-fno-ipa-reference", "-g0", "-fPIC", "-shared", "-Wl,--no-undefined", "-Wl,-Bsymbolic",
    "-pthread",
]
_BARRIER = re.compile(r"\b__syncthreads\(\)")


def rewrite_cuda(source: str, name: str = "", barrier_sites: list[str] | None = None) -> str:
    """The edits made to a .cu: launches ``k<<<cfg>>>(args)`` -> ``::cudashim::Launch(cfg).run(k, args)``;
    ``__shared__ T x[N];`` -> ``static T x[N]; ::cudashim::shared_region(&x, sizeof(x));``; each
    ``__syncthreads()`` -> ``::cudashim::barrier_at(SITE)``, its "file:line" appended to ``barrier_sites``."""
    source = _SHARED.sub(r"static \1 \2\3; ::cudashim::shared_region(&\2, sizeof(\2));", source)
    sites = barrier_sites if barrier_sites is not None else []

    def barrier(m: re.Match) -> str:
        sites.append(f"{name}:{source.count(chr(10), 0, m.start()) + 1}")
        return f"::cudashim::barrier_at({len(sites) - 1})"

    source = _BARRIER.sub(barrier, source)
    out, pos = [], 0
    for m in _LAUNCH.finditer(source):
        if m.start() < pos:
            continue
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        args = source[m.end() : i - 1].strip()
        out.append(source[pos : m.start()])
        out.append(f"::cudashim::Launch({m.group(2)}).run({m.group(1)}{', ' + args if args else ''})")
        pos = i
    out.append(source[pos:])
    return "".join(out)


@functools.cache
def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (for cuda_fp16.h & co.), found the way setup.py finds it."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "setup.py"), "--cuda-home"], capture_output=True, text=True, check=False
    )
    folder = proc.stdout.strip()
    return Path(folder) / "include" if proc.returncode == 0 and folder else None


def build_library(
    sources: list[Path | tuple[str, str]], name: str, defines: dict[str, str] | None = None
) -> tuple[Path, list[str]]:
    """Compiles ``sources`` (paths, or (file name, text) pairs) with the shim into a shared library;
    returns it and its __syncthreads() sites ("file:line", numbered as ``cudashim_disable_barrier`` takes them).

    ``.cu`` sources are rewritten by ``rewrite_cuda``; the result is cached by content under the temp dir.
    """
    include = cuda_include()
    if include is None or shutil.which("g++") is None:
        raise FileNotFoundError("building CUDA code for the host needs g++ and the CUDA headers (nvcc on PATH)")
    files = [(Path(s).name, Path(s).read_text()) if not isinstance(s, tuple) else s for s in sources]
    files.append(("cuda_shim.cpp", (SHIM_DIR / "cuda_shim.cpp").read_text()))
    defines = defines or {}
    sites: list[str] = []
    texts = {f: rewrite_cuda(t, f, sites) if f.endswith(".cu") else t for f, t in files}
    key = hashlib.sha256(
        repr((texts, sorted(defines.items()), _FLAGS, [p.read_bytes() for p in sorted(ROOT.glob("csrc/**/*.*h"))])).encode()
    ).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / f"fusedlr-cuda-on-host-{key}"
    lib = out_dir / f"{name}.so"
    if lib.exists():
        return lib, sites
    work = Path(tempfile.mkdtemp(prefix="fusedlr-cuda-on-host-"))
    paths = []
    for fname, text in texts.items():
        path = work / (fname + ".cpp" if fname.endswith(".cu") else fname)
        path.write_text(f'#line 1 "{fname}"\n' + text)
        paths.append(str(path))
    cmd = ["g++", *_FLAGS]
    cmd += ["-include", str(SHIM_DIR / "cuda_shim.h"), "-I", str(SHIM_DIR), "-I", str(ROOT / "csrc")]
    cmd += ["-I", str(ROOT / "csrc" / "cuda"), "-isystem", str(include)]
    cmd += [f"-D{k}={v}" for k, v in defines.items()]
    cmd += paths + ["-o", str(work / lib.name)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    out_dir.mkdir(exist_ok=True)
    os.replace(work / lib.name, lib)
    shutil.rmtree(work, ignore_errors=True)
    return lib, sites


class ShimLibrary:
    """CUDA sources built for the host (``build_library``), with the scheduler's controls."""

    def __init__(self, sources: list[Path | tuple[str, str]], name: str, defines: dict[str, str] | None = None) -> None:
        path, self.barrier_sites = build_library(sources, name, defines)
        self.lib = ctypes.CDLL(str(path))
        self.lib.cudashim_configure.argtypes = [ctypes.c_uint64, ctypes.c_double, ctypes.c_int]
        self.lib.cudashim_disable_barrier.argtypes = [ctypes.c_int]
        self.lib.cudashim_take_error.restype = ctypes.c_char_p

    def configure(self, seed: int, yield_prob: float = 0.25, resident_blocks: int = 2) -> None:
        """The interleaving: seed, chance of a switch at each primitive, blocks running at once."""
        self.lib.cudashim_configure(seed, yield_prob, resident_blocks)

    def disable_barrier(self, site: int | None) -> None:
        """Turns __syncthreads() number ``site`` (an index into ``barrier_sites``) into a no-op; None: none."""
        self.lib.cudashim_disable_barrier(-1 if site is None else site)

    def check(self, rc: int = 0) -> None:
        """Raises if the last launches failed (a barrier that cannot complete, a bad warp op...)."""
        error = self.lib.cudashim_take_error().decode()
        if rc != 0 or error:
            raise RuntimeError(f"kernel launch failed (rc {rc}): {error}")


def kernel_barrier_sites() -> list[str]:
    """The __syncthreads() sites of csrc/cuda/*.cu, as ``fusedlr_kernels().barrier_sites`` numbers them."""
    sites: list[str] = []
    for path in KERNEL_SOURCES:
        rewrite_cuda(path.read_text(), path.name, sites)
    return sites


@functools.cache
def fusedlr_kernels() -> ShimLibrary:
    """csrc/cuda/*.cu and their launch glue, built for the host."""
    return ShimLibrary([*KERNEL_SOURCES, SHIM_DIR / "kernels_on_host.cpp"], "fusedlr_kernels")


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _cache_pair(bucket, key: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (table, host mirror) pair of ``size`` int64 entries cached in ``bucket.cache`` under ``key`` (as
    ``fusedlr.extension.cuda``'s ``_table``; the mirror starts at -1, which matches no table)."""
    cached = bucket.cache.get(key)
    if cached is None or cached[0].numel() != size:
        cached = (torch.empty(size, dtype=torch.int64), torch.full((size,), -1, dtype=torch.int64))
        bucket.cache[key] = cached
    return cached


class EmulatedCudaBackend:
    """The fusedlr backend interface over the CUDA kernels run on the host (CPU tensors); it folds
    (``FOLDED``, ``fusedlr.control.FoldedUpdate``) and updates a launch set in one launch (``SETS``) as the CUDA
    backend does."""

    NAME = "cuda-emulated"
    FOLDED = True
    SETS = True

    def __init__(self, shim: ShimLibrary, grid: int) -> None:
        self.shim, self.lib, self.grid = shim, shim.lib, grid
        self.arrival = torch.zeros(1, dtype=torch.int32)  # of the folded update; the kernel leaves it zero
        self.set_uploads = 0  # copies of a launch set's table into its cached copy by the op path (``_cached``)
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.lib.fusedlr_emu_launchers.restype = p
        self.lib.fusedlr_emu_launchers.argtypes = [i32]
        self.lib.fusedlr_emu_fill_table.restype = i64
        self.lib.fusedlr_emu_fill_table.argtypes = [p, p, i64, i32, p]
        self.lib.fusedlr_emu_grad_stats.argtypes = [i32, p, i64, i64, p, p, i32, p, p, i32]
        self.lib.fusedlr_emu_adamw_update.argtypes = [
            i32, i32, p, i64, i64, p, i32, i32, p, p, p, p, p, p, i32, p, p, p, i32, i32, i32, i32, ctypes.c_uint32, p,
            p, i32, i32, i32, p, p, p, i64,
        ]
        self.lib.fusedlr_emu_fill_set_region.argtypes = [p, p, p, p, i64, p]
        self.lib.fusedlr_emu_segment_words.restype = i64
        self.lib.fusedlr_emu_launch_count.restype = i64

    def launch_count(self) -> int:
        """The kernel launches made through the host Launchers table (the fast path's) so far."""
        return self.lib.fusedlr_emu_launch_count()

    def folds(self, bucket, grads) -> bool:
        """The emulated kernels run every bucket (they copy gradients laid out unlike their param)."""
        return True

    def launchers(self) -> int:
        """The address of the host Launchers table (csrc/cuda/launchers.h) with this backend's grid."""
        return self.lib.fusedlr_emu_launchers(self.grid)

    def fast_path(self, buckets, runs, sets, device):
        """As ``fusedlr.extension.cuda.fast_path``: ``launchers()`` and buffers of the fast path cached in the
        buckets; a launch set of several buckets has the table its op path launch caches (``_cached``)."""
        updates = []
        for members in sets:
            first = buckets[members[0]]
            n = sum(len(buckets[i].params) for i in members)
            if len(members) == 1:
                updates.append((*_cache_pair(first, "emu_update_table", n * 9 + 1), self.arrival))
            else:
                size = n * 9 + 1 + n + len(members) * self.lib.fusedlr_emu_segment_words()
                updates.append((*_cache_pair(first, "emu_update_set_table", size), self.arrival))
        stats = [
            (*_cache_pair(buckets[m[0]], "emu_stats_table", sum(len(buckets[i].params) for i in m) * 3 + 1),
             torch.zeros(2 * self.grid + 1, dtype=torch.float32))
            for m in runs
        ]
        return self.launchers(), updates, stats

    def _cached(self, bucket, table: torch.Tensor) -> torch.Tensor:
        """A launch set's ``table`` as the CUDA backend keeps it: the copy cached in ``bucket`` (shared with the
        fast path), rewritten (an upload, counted in ``set_uploads``) only when its host mirror differs."""
        copy, host = _cache_pair(bucket, "emu_update_set_table", table.numel())
        if not torch.equal(host, table):
            copy.copy_(table)
            host.copy_(table)
            self.set_uploads += 1
        return copy

    def _table(self, lists, n):
        nptr = len(lists)
        ptrs = torch.tensor(
            [[0 if lst is None else lst[i].data_ptr() for lst in lists] for i in range(n)], dtype=torch.int64
        ).reshape(-1)
        numels = torch.tensor([lists[0][i].numel() for i in range(n)], dtype=torch.int64)
        table = torch.empty(n * (nptr + 2) + 1, dtype=torch.int64)
        total = self.lib.fusedlr_emu_fill_table(ptrs.data_ptr(), numels.data_ptr(), n, nptr, table.data_ptr())
        return table, total

    def grad_stats(self, bucket, grads, inv_scale, out, scale=None, reset=False) -> None:
        grads = [g.contiguous() for g in grads]
        table, total = self._table([grads], len(grads))
        grid = max(1, min(total, self.grid))
        workspace = torch.zeros(2 * grid + 1, dtype=torch.float32)
        rc = self.lib.fusedlr_emu_grad_stats(
            _DTYPE_CODE[grads[0].dtype],
            table.data_ptr(),
            len(grads),
            total,
            _ptr(inv_scale),
            _ptr(scale),
            int(reset),
            out.data_ptr(),
            workspace.data_ptr(),
            grid,
        )
        self.shim.check(rc)

    def grad_stats_set(self, buckets, grads, out, scale) -> None:
        """As the CUDA backend's: one launch per gradient dtype, the first writing ``out``."""
        for i, (b, gs) in enumerate(dtype_runs(buckets, grads)):
            self.grad_stats(b, gs, None, out, scale=scale, reset=i == 0)

    def prepare_update(self, bucket, grads, hyper, ctrl, applied_lr=None, fold=None):
        """The backend interface's two-phase update; the emulated launch has nothing to prepare."""
        return functools.partial(self.adamw_update, bucket, grads, hyper, ctrl, applied_lr, fold)

    def adamw_update(self, bucket, grads, hyper, ctrl, applied_lr=None, fold=None) -> None:
        if bucket.params:
            self._launch([bucket], [grads], [hyper], ctrl, applied_lr, [fold], launch_set=False)

    launch_key = staticmethod(launch_key)

    def prepare_update_set(self, buckets, grads, hypers, ctrl, applied_lr, folds):
        """As the CUDA backend's (``SETS``): the folded updates of a launch set, one launch; a set of one bucket
        too (which the CUDA backend launches as ``prepare_update``), so that the emulated optimizer steps run the
        set kernel instances in every precision mode."""
        return functools.partial(self.adamw_update_set, buckets, grads, hypers, ctrl, applied_lr, folds)

    def adamw_update_set(self, buckets, grads, hypers, ctrl, applied_lr, folds) -> None:
        """One launch_adamw_update_set over every segment (one per bucket); the step's outputs are the last fold's."""
        self._launch(buckets, grads, hypers, ctrl, applied_lr, folds, launch_set=True)

    def _launch(self, buckets, grads, hypers, ctrl, applied_lr, folds, launch_set: bool) -> None:
        """The update of ``buckets`` (one, or a launch set's), with ``hypers`` and ``folds`` (None: not folded)
        per bucket, through fusedlr_emu_adamw_update."""
        bucket, hyper, fold = buckets[0], hypers[0], folds[-1]
        lr = hyper.lr if isinstance(hyper.lr, torch.Tensor) else None
        # as the op: grads laid out like their param (copied otherwise)
        grads = [
            g if same_layout(g, p) else torch.empty_like(p, dtype=g.dtype).copy_(g)
            for b, gs in zip(buckets, grads)
            for g, p in zip(gs, b.params)
        ]
        prec = bucket.precision
        master = None if prec is None else prec.master
        remainder = None if prec is None else prec.remainder

        def per_param(get):
            lists = [get(b) for b in buckets]
            return None if lists[0] is None else [t for lst in lists for t in lst]

        params = per_param(lambda b: b.params)
        lists = [
            params, grads, per_param(lambda b: b.exp_avgs), per_param(lambda b: b.exp_avg_sqs),
            per_param(lambda b: b.max_exp_avg_sqs), per_param(lambda b: b.precision and b.precision.master),
            per_param(lambda b: b.precision and b.precision.remainder),
        ]
        n = len(params)
        table, total = self._table(lists, n)
        stochastic = prec is not None and prec.stochastic
        if launch_set:
            table = torch.cat([table, self._set_region(buckets, hypers, applied_lr, folds, stochastic)])
            if len(buckets) > 1:
                table = self._cached(bucket, table)
        param_dtype, state_dtype = bucket.params[0].dtype, bucket.exp_avgs[0].dtype
        math_dtype = torch.float64 if param_dtype == torch.float64 else torch.float32
        # the op's choice of the low-precision kernel (csrc/op_common.h, check_adamw_update)
        low_precision = (
            master is not None or remainder is not None or state_dtype != math_dtype
            or (stochastic and param_dtype == torch.bfloat16)
        )
        hyper6 = torch.tensor(
            [0.0 if lr is not None else hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay,
             ctrl.max_norm or 0.0],
            dtype=torch.float64,
        )
        grid = max(1, min(total, self.grid))
        lr_out = _ptr(applied_lr)
        if fold is not None and applied_lr is not None:  # the whole buffer: this group's entry
            lr_out = applied_lr.data_ptr() + fold.group * applied_lr.element_size()
        rc = self.lib.fusedlr_emu_adamw_update(
            _DTYPE_CODE[param_dtype],
            int(bucket.max_exp_avg_sqs is not None),
            table.data_ptr(),
            n,
            total,
            hyper6.data_ptr(),
            int(ctrl.max_norm is not None),
            int(hyper.maximize),
            ctrl.k.data_ptr(),
            _ptr(ctrl.schedule_table),
            _ptr(ctrl.stats),
            _ptr(ctrl.inv_scale),
            _ptr(ctrl.found_inf),
            bucket.steps.data_ptr(),
            grid,
            _ptr(lr if lr is not None and lr.dtype == torch.float32 else None),
            _ptr(lr if lr is not None and lr.dtype == torch.float64 else None),
            lr_out,
            int(low_precision),
            _DTYPE_CODE[state_dtype],
            0 if master is None and remainder is None else (1 if master is not None else 2),
            int(stochastic),
            0 if prec is None else prec.seed,
            _ptr(prec.pids if stochastic else None),
            None if fold is None else _ptr(fold.scale),
            int(fold is not None and fold.skip_nonfinite),
            int(fold is not None and not launch_set),  # a set advances its segments' steps itself
            int(fold is not None and fold.advance_k),
            None if fold is None else _ptr(fold.norm_out),
            None if fold is None else _ptr(fold.found_inf_out),
            self.arrival.data_ptr(),
            len(buckets) if launch_set else 0,
        )
        self.shim.check(rc)

    def _set_region(self, buckets, hypers, applied_lr, folds, stochastic: bool) -> torch.Tensor:
        """The set region of a launch set's table (csrc/cuda/table.h) through fusedlr_emu_fill_set_region."""
        nseg = len(buckets)
        lrs = [h.lr if isinstance(h.lr, torch.Tensor) else None for h in hypers]
        hyper5 = torch.tensor(
            [[0.0 if t is not None else h.lr, h.beta1, h.beta2, h.eps, h.weight_decay] for h, t in zip(hypers, lrs)],
            dtype=torch.float64,
        )
        maximize = torch.tensor([int(h.maximize) for h in hypers], dtype=torch.int64)
        ptrs5 = torch.tensor(
            [
                [
                    b.steps.data_ptr(),
                    t.data_ptr() if t is not None and t.dtype == torch.float32 else 0,
                    t.data_ptr() if t is not None and t.dtype == torch.float64 else 0,
                    applied_lr.data_ptr() + f.group * applied_lr.element_size() if applied_lr is not None else 0,
                    b.precision.pids.data_ptr() if stochastic else 0,
                ]
                for b, t, f in zip(buckets, lrs, folds)
            ],
            dtype=torch.int64,
        )
        sizes = torch.tensor([len(b.params) for b in buckets], dtype=torch.int64)
        region = torch.empty(int(sizes.sum()) + nseg * self.lib.fusedlr_emu_segment_words(), dtype=torch.int64)
        self.lib.fusedlr_emu_fill_set_region(
            hyper5.data_ptr(), maximize.data_ptr(), ptrs5.data_ptr(), sizes.data_ptr(), nseg, region.data_ptr()
        )
        return region
