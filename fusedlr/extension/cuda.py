"""backend="cuda": the compiled CUDA kernels of ``fusedlr._C``: one launch per pass per bucket.

Same interface and math as ``fusedlr.reference``. Each bucket keeps, in ``bucket.cache``, the
device table of pointers/numels its launches read and a host mirror of it: the table is
re-uploaded (async copy from pinned memory, no sync) only when a pointer changed, so steps are
sync-free and CUDA-graph capturable once a first (warm-up) step has run. A bucket whose params or
states are not dense (or whose grads have another dtype than the params) uses the reference.
It folds (``FOLDED``, see ``fusedlr.backends``): the kernels take a step's small ops (``fusedlr.control.FoldedUpdate``);
pass 1 of a folded step is one launch per gradient dtype (``grad_stats_set``), pass 2 one launch per launch set
(``SETS``: the buckets of every param group sharing a ``launch_key``, ``adamw_update_set.cached``).
Eager steps take ``fusedlr.fast_step``'s C++ call instead, on the same cached tables (``fast_path``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from .. import extension, reference
from ..bucket import Bucket
from ..control import FoldedUpdate, GroupHyper, StepControl
from ._common import (
    check_folds,
    checked_update_set_args,
    compiled_ok,
    dtype_runs,
    kernel_grads,
    launch_key,
    update_args,
    update_kwargs,
)

__all__ = [
    "FOLDED",
    "NAME",
    "SETS",
    "adamw_update",
    "available",
    "fast_path",
    "folds",
    "grad_stats",
    "grad_stats_set",
    "launch_key",
    "prepare_update",
    "prepare_update_set",
]

NAME = "cuda"
FOLDED = True
SETS = True


def available(device: torch.device) -> str | None:
    """None when the compiled CUDA kernels can run on ``device``; else why not (and the fix)."""
    error = extension.load_error()
    if error is not None:
        return error
    device = torch.device(device)
    if device.type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, not {device}; use backend='cpu' (or 'auto') for CPU tensors"
    if not extension.has_kernel("cuda"):
        return (
            "fusedlr._C was built without its CUDA kernels (torch.version.cuda="
            f"{torch.version.cuda}); rebuild with nvcc and a CUDA build of torch: "
            "FUSEDLR_BUILD_CUDA=1 pip install --no-build-isolation -e ."
        )
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return _arch_reason(device)


def _arch_reason(device: torch.device) -> str | None:
    """Why the compiled kernels cannot run on this GPU's architecture (None when they may)."""
    archs = tuple(getattr(extension._C, "CUDA_ARCHS", ()))
    if not archs:
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if any(arch <= major * 100 + minor * 10 for arch in archs):  # same-major binary or PTX JIT
        return None
    built = ", ".join(f"sm_{arch // 10}" for arch in archs)
    return (
        f"fusedlr._C was compiled for {built}, but {device} is sm_{major}{minor}; rebuild it with "
        f'TORCH_CUDA_ARCH_LIST="{major}.{minor}" FUSEDLR_BUILD_CUDA=1 pip install --no-build-isolation -e .'
    )


@torch.compiler.disable
def _table(
    bucket: Bucket, key: str, n: int, nptr: int, device: torch.device, segments: int = 0
) -> tuple[Tensor, Tensor]:
    """The (device table, host mirror) pair cached for one op of ``bucket`` (``segments``: of a launch set of that
    many buckets, whose table ends with the set region, csrc/cuda/table.h)."""
    cached = bucket.cache.get(key)
    size = n * (nptr + 2) + 1 + (n + segments * extension._C.SET_SEGMENT_WORDS if segments else 0)
    if cached is None or cached[0].numel() != size or cached[0].device != device:
        cached = (
            torch.empty(size, dtype=torch.int64, device=device),
            torch.full((size,), -1, dtype=torch.int64),  # matches no real table: the first call uploads
        )
        bucket.cache[key] = cached
    return cached


@torch.compiler.disable
def _workspace(bucket: Bucket, device: torch.device) -> Tensor:
    """The zeroed float32 workspace of the two-stage reduction, ``2 * max blocks + 1`` (cached; the
    kernel leaves it zeroed)."""
    ws = bucket.cache.get("fusedlr_cuda_stats_workspace")
    if not isinstance(ws, Tensor) or ws.device != device:
        blocks = torch.cuda.get_device_properties(device).multi_processor_count * extension._C.CUDA_BLOCKS_PER_SM
        ws = torch.zeros(2 * blocks + 1, dtype=torch.float32, device=device)
        bucket.cache["fusedlr_cuda_stats_workspace"] = ws
    return ws


@torch.compiler.disable
def _arrival(bucket: Bucket, device: torch.device) -> Tensor:
    """The zeroed int32 arrival counter of a folded update launch (cached; the kernel leaves it zero)."""
    counter = bucket.cache.get("fusedlr_cuda_update_workspace")
    if not isinstance(counter, Tensor) or counter.device != device:
        counter = torch.zeros(1, dtype=torch.int32, device=device)
        bucket.cache["fusedlr_cuda_update_workspace"] = counter
    return counter


def folds(bucket: Bucket, grads: list[Tensor]) -> bool:
    """Whether the kernels run this bucket, so that its update may take a ``FoldedUpdate``."""
    return compiled_ok(bucket, grads, NAME)


def fast_path(
    buckets: Sequence[Bucket], runs: Sequence[Sequence[int]], sets: Sequence[Sequence[int]], device: torch.device
) -> tuple[int, list[tuple[Tensor, Tensor, Tensor]], list[tuple[Tensor, Tensor, Tensor]]]:
    """What ``fusedlr.fast_step`` launches a folded step of ``buckets`` with (``runs``: the buckets of each pass-1
    launch, ``sets``: of each launch set, indices): the address of the launchers table (``fusedlr._C.CUDA_LAUNCHERS``,
    0 without the CUDA kernels), each set's (update table, host mirror, arrival counter) and each run's (stats
    table, host mirror, workspace). These are the op path's own cached buffers (``prepare_update_set``: a set of
    one bucket has the bucket's table, a larger one the set table of its first bucket; ``grad_stats_set``), so that
    a CUDA graph captured on the op path after eager fast steps finds its tables uploaded."""
    ptrs = extension._C.UPDATE_TABLE_PTRS
    updates = []
    for members in sets:
        first = buckets[members[0]]
        if len(members) == 1:
            table = _table(first, "fusedlr_cuda_update_table", len(first.params), ptrs, device)
        else:
            n = sum(len(buckets[i].params) for i in members)
            table = _table(first, "fusedlr_cuda_update_set_table", n, ptrs, device, len(members))
        updates.append((*table, _arrival(first, device)))
    stats = []
    for members in runs:
        first = buckets[members[0]]
        n = sum(len(buckets[i].params) for i in members)
        table = _table(first, "fusedlr_cuda_stats_set_table", n, extension._C.STATS_TABLE_PTRS, device)
        stats.append((*table, _workspace(first, device)))
    return getattr(extension._C, "CUDA_LAUNCHERS", 0), updates, stats


def grad_stats(
    bucket: Bucket,
    grads: list[Tensor],
    inv_scale: Tensor | None,
    out: Tensor,
    scale: Tensor | None = None,
    reset: bool = False,
) -> None:
    """Pass 1 (see ``fusedlr.reference.grad_stats``): one launch, a fixed-order two-stage reduction into
    ``out`` (bitwise reproducible, no floating-point atomics); folded: GradScaler's ``scale`` instead of
    ``inv_scale``, and ``reset`` writes ``out`` instead of adding to it (a memset when no chunk)."""
    table, host = _table(bucket, "fusedlr_cuda_stats_table", len(grads), extension._C.STATS_TABLE_PTRS, out.device)
    torch.ops.fusedlr.grad_stats(
        grads, inv_scale, out, table, host, _workspace(bucket, out.device), scale=scale, reset=reset
    )


def grad_stats_set(buckets: Sequence[Bucket], grads: Sequence[list[Tensor]], out: Tensor, scale: Tensor | None) -> None:
    """Pass 1 of several folding buckets: one launch per gradient dtype (``dtype_runs``; the first writes ``out``,
    the others add to it), whatever the number of buckets and param groups."""
    runs = dtype_runs(buckets, grads)
    for i, (b, gs) in enumerate(runs):
        table, host = _table(b, "fusedlr_cuda_stats_set_table", len(gs), extension._C.STATS_TABLE_PTRS, out.device)
        torch.ops.fusedlr.grad_stats(gs, None, out, table, host, _workspace(b, out.device), scale=scale, reset=i == 0)


def prepare_update(
    bucket: Bucket,
    grads: list[Tensor],
    hyper: GroupHyper,
    ctrl: StepControl,
    applied_lr: Tensor | None = None,
    fold: FoldedUpdate | None = None,
) -> Callable[[], None]:
    """Pass 2, prepared (see ``fusedlr.reference.prepare_update``; ``fold``: ``FoldedUpdate``): checks,
    fallback decision, table and the gradients' layout copies here; the commit is one launch (also with
    no chunk when it has outputs to write), nothing but ``fold``'s flags written when the step is skipped."""
    if not check_folds(bucket, grads, NAME, fold):
        return reference.prepare_update(bucket, grads, hyper, ctrl, applied_lr)
    table, host = _table(
        bucket, "fusedlr_cuda_update_table", len(bucket.params), extension._C.UPDATE_TABLE_PTRS, bucket.device
    )
    args = update_args(bucket, kernel_grads(bucket, grads), hyper, ctrl)
    kwargs = update_kwargs(bucket, hyper, applied_lr, fold)
    if fold is not None:
        kwargs["workspace"] = _arrival(bucket, bucket.device)
    return partial(torch.ops.fusedlr.adamw_update, *args, table, host, **kwargs)


def prepare_update_set(
    buckets: Sequence[Bucket],
    grads: Sequence[list[Tensor]],
    hypers: Sequence[GroupHyper],
    ctrl: StepControl,
    applied_lr: Tensor,
    folds: Sequence[FoldedUpdate],
) -> Callable[[], None]:
    """The folded updates (``folds``) of the buckets of one launch set (one ``launch_key``, every bucket folding),
    prepared as ``prepare_update``; the commit is one launch over every bucket (its table and arrival counter
    cached in the first bucket). A set of one bucket is ``prepare_update``'s launch: the single-bucket kernel
    instances of the default 16/32-bit update keep 2 resident blocks per SM, the set instances 1."""
    if len(buckets) == 1:
        return prepare_update(buckets[0], grads[0], hypers[0], ctrl, applied_lr, folds[0])
    args = checked_update_set_args(buckets, grads, hypers, ctrl, applied_lr, folds, NAME)
    first = buckets[0]
    n = sum(len(b.params) for b in buckets)
    table, host = _table(
        first, "fusedlr_cuda_update_set_table", n, extension._C.UPDATE_TABLE_PTRS, first.device, len(buckets)
    )
    return partial(
        torch.ops.fusedlr.adamw_update_set.cached, **args, table=table, table_host=host,
        workspace=_arrival(first, first.device),
    )


def adamw_update(
    bucket: Bucket, grads: list[Tensor], hyper: GroupHyper, ctrl: StepControl, applied_lr: Tensor | None = None
) -> None:
    """Pass 2 (see ``fusedlr.reference.adamw_update``)."""
    prepare_update(bucket, grads, hyper, ctrl, applied_lr)()
