"""The Triton backend: the interface of ``fusedlr.reference`` with one kernel launch per bucket and pass.

``grad_stats`` (pass 1) and ``adamw_update`` (pass 2) each enqueue a single multi-tensor launch
whatever the number of tensors (pass 2: two when a bucket holds both 16-byte aligned tensors and
others, a vectorized and a scalar launch), addressed through device-resident pointer tables built
once per bucket or launch set (``tables.py``). Nothing reads a device value on the host, so a step never
syncs and can be captured in a CUDA graph (after one eager step, which builds the tables).

Runs on CUDA devices, and on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``; slow,
for tests). The low-precision modes (``fusedlr.precision``: master weights, remainders, stochastic
rounding, bfloat16 moments) run in the kernel too. Buckets whose params or states are not dense in
one shared layout (see ``tables.py``) are updated by the reference backend instead.

It folds (``FOLDED``, see ``fusedlr.backends``): with ``fusedlr.control.FoldedUpdate`` the kernels also do a
step's small ops (GradScaler's inverse scale, the inf check, resetting the norm buffer, the step counters,
``k``, ``grad_norm`` and ``found_inf``), so that a steady step enqueues nothing but its kernel launches; and a
folded step takes several buckets per launch (``SETS``): pass 1 one launch per gradient dtype
(``grad_stats_set``), pass 2 one launch per launch set (``prepare_update_set``: the buckets of one ``launch_key``,
whatever their param groups, each group's hyperparameters read from a device segment table).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from .. import reference
from ..bucket import Bucket
from ..control import FoldedUpdate, GroupHyper, StepControl
from ..extension._common import check_launch_set, launch_key

# The kernel modules import triton (which reads TRITON_INTERPRET when the kernels are defined).
# Imported before the functions below are defined: ``grad_stats`` names both a submodule and a
# function of this package, and the function must win.
#: The oldest triton the kernels are tested with (3.6 on the GPU machine, the newest in CI). Older ones
#: differ in APIs the kernels use (torch 2.6 pins triton 3.2, whose interpreter also mishandles them).
MIN_TRITON = (3, 6)

try:
    import triton

    from . import adamw as _adamw_kernel
    from . import grad_stats as _grad_stats_kernel
    from . import tables as _tables

    _IMPORT_ERROR: Exception | None = None
    # Whether the kernels were defined for the interpreter (TRITON_INTERPRET=1 at import).
    _INTERPRETED = type(_adamw_kernel._adamw_kernel).__name__ == "InterpretedFunction"
except ImportError as _err:  # triton missing or broken: available() says so
    _IMPORT_ERROR = _err
    _INTERPRETED = False

__all__ = [
    "FOLDED",
    "NAME",
    "SETS",
    "adamw_update",
    "available",
    "folds",
    "grad_stats",
    "grad_stats_set",
    "launch_key",
    "prepare_update",
    "prepare_update_set",
]

NAME = "triton"
FOLDED = True
SETS = True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def available(device: torch.device) -> str | None:
    """None when this backend can run on ``device``, else the reason and the fix."""
    if _IMPORT_ERROR is not None:
        if getattr(_IMPORT_ERROR, "name", None) == "triton":
            return "triton is not installed: pip install triton"
        return f"triton could not be imported ({_IMPORT_ERROR}): reinstall it (pip install -U triton)"
    if _version(triton.__version__) < MIN_TRITON:
        return (
            f"fusedlr's Triton kernels need triton>={'.'.join(map(str, MIN_TRITON))}, found {triton.__version__}: "
            "upgrade torch (which pins its triton) or use backend='cuda' or 'torch'"
        )
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available to torch: install a CUDA build of torch and a GPU driver"
        return None
    if device.type == "cpu":
        if _interpreting():
            if not _INTERPRETED:
                return (
                    "the kernels were defined before TRITON_INTERPRET=1 was set: set it before "
                    "fusedlr.triton is first imported"
                )
            return None
        return (
            "triton kernels need a CUDA device; on the CPU they only run under the interpreter "
            "(set TRITON_INTERPRET=1 before importing triton; slow, for tests), or use backend='torch'"
        )
    return f"triton backend runs on CUDA devices, not {device.type}: use backend='torch'"


def folds(bucket: Bucket, grads: list[Tensor]) -> bool:
    """Whether the kernels run this bucket, so that its update may take a ``FoldedUpdate``: not for a bucket
    the reference updates, nor for one of zero-size tensors only (no program to do the folded work). Builds no
    table (a folded step addresses its buckets by launch set)."""
    runs = bucket.cache.get("triton.folds")
    if runs is None:
        runs = bucket.cache["triton.folds"] = _tables.addressable(bucket) and any(p.numel() > 0 for p in bucket.params)
    return runs  # type: ignore[return-value]


def grad_stats(
    bucket: Bucket,
    grads: list[Tensor],
    inv_scale: Tensor | None,
    out: Tensor,
    scale: Tensor | None = None,
    reset: bool = False,
) -> None:
    """Pass 1: ``out[0] += sum((g * inv_scale)^2)`` (float32), ``out[1] += non-finite count``; one launch.
    Folded: GradScaler's ``scale`` instead of ``inv_scale`` (inverted in the kernel), and ``reset`` writes
    ``out`` instead of adding to it."""
    tables = _tables.bucket_tables(bucket)
    if tables is None:
        if scale is not None or reset:
            raise ValueError("fusedlr backend='triton': a folded pass 1 of a bucket the kernels do not run")
        reference.grad_stats(bucket, grads, inv_scale, out)
        return
    if tables.n_blocks == 0:  # no program (such a bucket does not fold): a torch op resets ``out``
        if reset:
            out.zero_()
        return
    gtab, used = _tables.grad_table(tables, [bucket], [grads])
    _grad_stats_kernel.launch_grad_stats(tables, gtab, used[0].dtype, inv_scale, out, scale, reset)


def grad_stats_set(buckets: Sequence[Bucket], grads: Sequence[list[Tensor]], out: Tensor, scale: Tensor | None) -> None:
    """Pass 1 of a folded step (every bucket folding, ``folds``): one launch per gradient dtype over every bucket
    with gradients of that dtype (``tables.set_tables``), the first writing ``out``, the others adding to it."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, gs in enumerate(grads):
        if gs:
            by_dtype.setdefault(gs[0].dtype, []).append(i)
    for n, members in enumerate(by_dtype.values()):
        run = [buckets[i] for i in members]
        tables = _tables.set_tables(run)
        if tables is None or tables.n_blocks == 0:
            raise ValueError("fusedlr backend='triton': a folded pass 1 of a bucket the kernels do not run")
        gtab, used = _tables.grad_table(tables, run, [grads[i] for i in members])
        _grad_stats_kernel.launch_grad_stats(tables, gtab, used[0].dtype, None, out, scale, n == 0)


def _launch(launch: Callable[[], None], keep: list[Tensor]) -> None:
    """Enqueue ``launch``; ``keep``: the gradient tensors its table points to, alive until then."""
    launch()


def prepare_update(
    bucket: Bucket,
    grads: list[Tensor],
    hyper: GroupHyper,
    ctrl: StepControl,
    applied_lr: Tensor | None = None,
    fold: FoldedUpdate | None = None,
) -> Callable[[], None]:
    """Pass 2, prepared (see ``fusedlr.reference.prepare_update``; ``fold``: ``FoldedUpdate``, for buckets that
    ``folds``: ``prepare_update_set`` of one bucket): the fallback decision, the launch tables, the gradients'
    layout copies and the launch's checks happen here; the commit is one launch, or two for mixed alignment
    (``fusedlr.reference``'s math)."""
    if fold is not None:
        return prepare_update_set([bucket], [grads], [hyper], ctrl, applied_lr, [fold])
    if not folds(bucket, grads):  # nothing to launch, or not addressable in storage order
        return reference.prepare_update(bucket, grads, hyper, ctrl, applied_lr)
    tables = _tables.bucket_tables(bucket)
    gtab, used = _tables.grad_table(tables, [bucket], [grads])
    commit = _adamw_kernel.prepare_launch(tables, gtab, bucket, used[0].dtype, hyper, ctrl, applied_lr)
    return partial(_launch, commit, used)


def prepare_update_set(
    buckets: Sequence[Bucket],
    grads: Sequence[list[Tensor]],
    hypers: Sequence[GroupHyper],
    ctrl: StepControl,
    applied_lr: Tensor | None,
    folds: Sequence[FoldedUpdate],
) -> Callable[[], None]:
    """The folded updates (``folds``) of the buckets of one launch set (one ``launch_key``, every bucket folding),
    prepared as ``prepare_update``; the commit is one launch (two for mixed alignment) whose segment table holds
    each bucket's hyperparameters, ``applied_lr`` slot and step counters."""
    check_launch_set(buckets, grads, NAME)
    tables = _tables.set_tables(buckets)
    if tables is None or any(not gs for gs in grads) or min(tables.segment_first) < 0:
        raise ValueError("fusedlr backend='triton': a folded update of a bucket the kernels do not run")
    gtab, used = _tables.grad_table(tables, buckets, grads)
    commit = _adamw_kernel.prepare_set_launch(tables, gtab, buckets, used[0].dtype, hypers, ctrl, applied_lr, folds)
    return partial(_launch, commit, used)


def adamw_update(
    bucket: Bucket, grads: list[Tensor], hyper: GroupHyper, ctrl: StepControl, applied_lr: Tensor | None = None
) -> None:
    """Pass 2: one AdamW update of every tensor of ``bucket`` (``fusedlr.reference``'s math); one launch
    (two when aligned and misaligned tensors are mixed, see ``tables.py``)."""
    prepare_update(bucket, grads, hyper, ctrl, applied_lr)()
