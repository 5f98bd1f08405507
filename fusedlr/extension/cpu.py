"""backend="cpu": the compiled C++ kernels (OpenMP, vectorised) of ``fusedlr._C`` for CPU tensors.

Same interface and math as ``fusedlr.reference``; a bucket whose parameters or states are not
dense (or whose grads have another dtype than the params) is handed to the reference instead.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from .. import extension, reference
from ..bucket import Bucket
from ..control import GroupHyper, StepControl
from ._common import compiled_ok, kernel_grads, update_args, update_kwargs

__all__ = ["NAME", "adamw_update", "available", "grad_stats", "prepare_update"]

NAME = "cpu"


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


def grad_stats(bucket: Bucket, grads: list[Tensor], inv_scale: Tensor | None, out: Tensor) -> None:
    """Pass 1 (see ``fusedlr.reference.grad_stats``)."""
    torch.ops.fusedlr.grad_stats(grads, inv_scale, out)


def prepare_update(
    bucket: Bucket, grads: list[Tensor], hyper: GroupHyper, ctrl: StepControl, applied_lr: Tensor | None = None
) -> Callable[[], None]:
    """Pass 2, prepared (see ``fusedlr.reference.prepare_update``): the checks, the fallback decision and
    the gradients' layout copies happen here; the commit is the op, which then allocates nothing."""
    if not compiled_ok(bucket, grads, NAME):
        return reference.prepare_update(bucket, grads, hyper, ctrl, applied_lr)
    args = update_args(bucket, kernel_grads(bucket, grads), hyper, ctrl)
    return partial(torch.ops.fusedlr.adamw_update, *args, **update_kwargs(bucket, hyper, applied_lr))


def adamw_update(
    bucket: Bucket, grads: list[Tensor], hyper: GroupHyper, ctrl: StepControl, applied_lr: Tensor | None = None
) -> None:
    """Pass 2 (see ``fusedlr.reference.adamw_update``)."""
    prepare_update(bucket, grads, hyper, ctrl, applied_lr)()
