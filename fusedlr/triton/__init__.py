"""The Triton backend: the interface of ``fusedlr.reference`` with one kernel launch per bucket and pass.

``grad_stats`` (pass 1) and ``adamw_update`` (pass 2) each enqueue a single multi-tensor launch
whatever the number of tensors (pass 2: two when a bucket holds both 16-byte aligned tensors and
others, a vectorized and a scalar launch), addressed through device-resident pointer tables built
once per bucket (``tables.py``). Nothing reads a device value on the host, so a step never syncs and can be
captured in a CUDA graph (after one eager step, which builds the tables).

Runs on CUDA devices, and on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``; slow,
for tests). The low-precision modes (``fusedlr.precision``: master weights, remainders, stochastic
rounding, bfloat16 moments) run in the kernel too. Buckets whose params or states are not dense in
one shared layout (see ``tables.py``) are updated by the reference backend instead.

It folds (``FOLDED``, see ``fusedlr.backends``): with ``fusedlr.control.FoldedUpdate`` the kernels also do a
step's small ops (GradScaler's inverse scale, the inf check, resetting the norm buffer, the step counters,
``k``, ``grad_norm`` and ``found_inf``), so that a steady step enqueues nothing but its kernel launches.
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

__all__ = ["FOLDED", "NAME", "adamw_update", "available", "folds", "grad_stats", "grad_stats_set", "prepare_update"]

NAME = "triton"
FOLDED = True


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
    the reference updates, nor for one of zero-size tensors only (no program to do the folded work)."""
    tables = _tables.bucket_tables(bucket)
    return tables is not None and tables.n_blocks > 0


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
    gtab, used = _tables.grad_table(tables, bucket, grads)
    _grad_stats_kernel.launch_grad_stats(tables, gtab, used[0].dtype, inv_scale, out, scale, reset)


def grad_stats_set(buckets: Sequence[Bucket], grads: Sequence[list[Tensor]], out: Tensor, scale: Tensor | None) -> None:
    """Pass 1 of a folded step: one launch per bucket, the first writing ``out``, the others adding to it."""
    for i, (bucket, gs) in enumerate(zip(buckets, grads)):
        grad_stats(bucket, gs, None, out, scale=scale, reset=i == 0)


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
    ``folds``): the fallback decision, the launch tables, the gradients' layout copies and the launch's checks
    happen here; the commit is one launch, or two for mixed alignment (``fusedlr.reference``'s math)."""
    if not folds(bucket, grads):  # nothing to launch, or not addressable in storage order
        if fold is not None:
            raise ValueError("fusedlr backend='triton': a folded update of a bucket the kernels do not run")
        return reference.prepare_update(bucket, grads, hyper, ctrl, applied_lr)
    tables = _tables.bucket_tables(bucket)
    gtab, used = _tables.grad_table(tables, bucket, grads)
    return partial(
        _launch,
        _adamw_kernel.prepare_launch(
            tables,
            gtab,
            bucket.steps,
            bucket.params[0].dtype,
            used[0].dtype,
            bucket.exp_avgs[0].dtype,
            bucket.max_exp_avg_sqs is not None,
            hyper,
            ctrl,
            bucket.precision,
            applied_lr,
            fold,
        ),
        used,
    )


def adamw_update(
    bucket: Bucket, grads: list[Tensor], hyper: GroupHyper, ctrl: StepControl, applied_lr: Tensor | None = None
) -> None:
    """Pass 2: one AdamW update of every tensor of ``bucket`` (``fusedlr.reference``'s math); one launch
    (two when aligned and misaligned tensors are mixed, see ``tables.py``)."""
    prepare_update(bucket, grads, hyper, ctrl, applied_lr)()
