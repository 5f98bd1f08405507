"""backend="cpu": the compiled C++ kernels (OpenMP, vectorised) of ``fusedlr._C`` for CPU tensors.

Same interface and math as ``fusedlr.reference``; a bucket whose parameters or states are not
dense (or whose grads have another dtype than the params) is handed to the reference instead.
It folds (``FOLDED``, see ``fusedlr.backends``): the ops take a step's small ops (``fusedlr.control.FoldedUpdate``),
and updates several buckets in one op (``SETS``): the whole pass 1 of a step, and the updates of each launch set.
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
    "folds",
    "grad_stats",
    "grad_stats_set",
    "launch_key",
    "prepare_update",
    "prepare_update_set",
]

NAME = "cpu"
FOLDED = True
SETS = True


def available(device: torch.device) -> str | None:
    """None when the compiled CPU kernels can run on ``device``; else why not (and the fix)."""
    error = extension.load_error()
    if error is not None:
        return error
    if torch.device(device).type != "cpu":
        return f"backend 'cpu' runs on CPU tensors, not {device}; use backend='cuda' (or 'auto') for GPU tensors"
    if not extension.has_kernel("cpu"):
        return f"fusedlr._C has no CPU kernels registered; rebuild it: {extension.INSTALL_HINT}"
    return None


def folds(bucket: Bucket, grads: list[Tensor]) -> bool:
    """Whether the kernels run this bucket, so that its update may take a ``FoldedUpdate``."""
    return compiled_ok(bucket, grads, NAME)


def grad_stats(
    bucket: Bucket,
    grads: list[Tensor],
    inv_scale: Tensor | None,
    out: Tensor,
    scale: Tensor | None = None,
    reset: bool = False,
) -> None:
    """Pass 1 (see ``fusedlr.reference.grad_stats``); folded: GradScaler's ``scale`` instead of ``inv_scale``,
    and ``reset`` writes ``out`` instead of adding to it."""
    torch.ops.fusedlr.grad_stats(grads, inv_scale, out, scale=scale, reset=reset)


def grad_stats_set(buckets: Sequence[Bucket], grads: Sequence[list[Tensor]], out: Tensor, scale: Tensor | None) -> None:
    """Pass 1 of several folding buckets (any dtypes) in one op: ``out`` written (not added to) with their stats,
    the float32 sums added bucket by bucket in their order, as one ``grad_stats`` call per bucket would."""
    flat = [g for gs in grads for g in gs]
    torch.ops.fusedlr.grad_stats_set(flat, [len(gs) for gs in grads], out, scale=scale, reset=True)


def prepare_update(
    bucket: Bucket,
    grads: list[Tensor],
    hyper: GroupHyper,
    ctrl: StepControl,
    applied_lr: Tensor | None = None,
    fold: FoldedUpdate | None = None,
) -> Callable[[], None]:
    """Pass 2, prepared (see ``fusedlr.reference.prepare_update``; ``fold``: ``FoldedUpdate``): the checks, the
    fallback decision and the gradients' layout copies happen here; the commit is the op, which then
    allocates nothing."""
    if not check_folds(bucket, grads, NAME, fold):
        return reference.prepare_update(bucket, grads, hyper, ctrl, applied_lr)
    args = update_args(bucket, kernel_grads(bucket, grads), hyper, ctrl)
    return partial(torch.ops.fusedlr.adamw_update, *args, **update_kwargs(bucket, hyper, applied_lr, fold))


def prepare_update_set(
    buckets: Sequence[Bucket],
    grads: Sequence[list[Tensor]],
    hypers: Sequence[GroupHyper],
    ctrl: StepControl,
    applied_lr: Tensor,
    folds: Sequence[FoldedUpdate],
) -> Callable[[], None]:
    """The folded updates (``folds``) of the buckets of one launch set (one ``launch_key``, every bucket folding),
    prepared as ``prepare_update``; the commit is one op."""
    args = checked_update_set_args(buckets, grads, hypers, ctrl, applied_lr, folds, NAME)
    return partial(torch.ops.fusedlr.adamw_update_set, **args)


def adamw_update(
    bucket: Bucket, grads: list[Tensor], hyper: GroupHyper, ctrl: StepControl, applied_lr: Tensor | None = None
) -> None:
    """Pass 2 (see ``fusedlr.reference.adamw_update``)."""
    prepare_update(bucket, grads, hyper, ctrl, applied_lr)()
