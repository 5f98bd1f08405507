"""backend="cpu": the compiled C++ kernels (OpenMP, vectorised) of ``fusedlr._C`` for CPU tensors.

Same interface and math as ``fusedlr.reference``; a bucket whose parameters or states are not
dense (or whose grads have another dtype than the params) is handed to the reference instead.
It folds (``FOLDED``, see ``fusedlr.backends``): the ops take a step's small ops (``fusedlr.control.FoldedUpdate``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from .. import extension, reference
from ..bucket import Bucket
from ..control import FoldedUpdate, GroupHyper, StepControl
from ._common import check_folds, compiled_ok, kernel_grads, update_args, update_kwargs

__all__ = ["FOLDED", "NAME", "adamw_update", "available", "folds", "grad_stats", "prepare_update"]

NAME = "cpu"
FOLDED = True


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


def adamw_update(
    bucket: Bucket, grads: list[Tensor], hyper: GroupHyper, ctrl: StepControl, applied_lr: Tensor | None = None
) -> None:
    """Pass 2 (see ``fusedlr.reference.adamw_update``)."""
    prepare_update(bucket, grads, hyper, ctrl, applied_lr)()
