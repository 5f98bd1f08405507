"""What the compiled backends (``cpu``, ``cuda``) share: the per-bucket layout check, the op arguments and
the launch sets (the buckets one op call updates)."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from ..bucket import Bucket
from ..control import FoldedUpdate, GroupHyper, StepControl

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def linear(t: Tensor) -> bool:
    """Contiguous, or non-overlapping and dense (e.g. channels_last): walkable from data_ptr() over numel()."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _bucket_reason(bucket: Bucket) -> str | None:
    """Why the compiled kernels cannot update this bucket in place, or None."""
    states = [bucket.exp_avgs, bucket.exp_avg_sqs] + ([bucket.max_exp_avg_sqs] if bucket.max_exp_avg_sqs else [])
    prec = bucket.precision
    if prec is not None:
        states += [s for s in (prec.master, prec.remainder) if s is not None]
    if bucket.params and bucket.params[0].dtype not in _SUPPORTED:
        return f"unsupported dtype {bucket.params[0].dtype}"
    for i, p in enumerate(bucket.params):
        if not linear(p):
            return f"parameter {i} (shape {tuple(p.shape)}, strides {p.stride()}) is not dense"
        for s in states:
            if not (linear(s[i]) and same_layout(s[i], p)):
                return f"the state of parameter {i} is not laid out like the parameter"
    return None


def compiled_ok(bucket: Bucket, grads: list[Tensor], backend: str) -> bool:
    """Whether the compiled kernels run this bucket; else the caller uses fusedlr.reference.

    The parameter/state layout is checked once per bucket (cached in ``bucket.cache``); tensors
    updated in place are never copied. Gradients are only read: the kernels copy any whose
    layout differs from its parameter's, but a grad dtype different from the param dtype falls back.
    """
    reason = bucket.cache.get("fusedlr_ext_reason", False)
    if reason is False:
        reason = _bucket_reason(bucket)
        bucket.cache["fusedlr_ext_reason"] = reason
        if reason is not None:
            warnings.warn(
                f"fusedlr backend={backend!r}: {reason}; this bucket is updated by the torch reference backend "
                "(the compiled kernels update in place and never copy parameters or states)",
                RuntimeWarning,
                stacklevel=3,
            )
    if reason is not None:
        return False
    return not grads or grads[0].dtype == bucket.params[0].dtype


def check_folds(bucket: Bucket, grads: list[Tensor], backend: str, fold: FoldedUpdate | None) -> bool:
    """``compiled_ok``, refusing a folded update (``fold``) of a bucket the kernels do not run (callers ask
    the backend's ``folds`` first)."""
    ok = compiled_ok(bucket, grads, backend)
    if fold is not None and not ok:
        raise ValueError(f"fusedlr backend={backend!r}: a folded update of a bucket the kernels do not run")
    return ok


def kernel_grads(bucket: Bucket, grads: list[Tensor]) -> list[Tensor]:
    """``grads`` as the kernels read them: each laid out like its parameter (a copy made here otherwise,
    so that the kernels never allocate; gradients are only read)."""
    return [
        g if linear(g) and same_layout(g, p) else torch.empty_like(p, dtype=g.dtype).copy_(g)
        for g, p in zip(grads, bucket.params)
    ]


def schedule_table(bucket: Bucket, ctrl: StepControl) -> Tensor | None:
    if ctrl.schedule is None:
        return None
    if ctrl.schedule_table is not None:
        return ctrl.schedule_table
    table = bucket.cache.get("fusedlr_schedule_table")
    if not isinstance(table, Tensor) or table.device != ctrl.k.device:
        table = ctrl.schedule.as_tensor(ctrl.k.device)
        bucket.cache["fusedlr_schedule_table"] = table
    return table


def _float32(t: Tensor | None) -> Tensor | None:
    """``t`` as the ops read a 0-d control tensor (found_inf, inv_scale): float32 (converted when it is not)."""
    return t if t is None or t.dtype == torch.float32 else t.to(torch.float32)


def update_args(bucket: Bucket, grads: list[Tensor], hyper: GroupHyper, ctrl: StepControl) -> tuple:
    """Positional arguments of ``torch.ops.fusedlr.adamw_update`` up to ``remainders`` (without the table
    cache; a tensor LR and stochastic rounding's key go in keyword arguments, see ``update_kwargs``).
    ``masters``/``remainders`` are required lists, empty when ``bucket.precision`` has none."""
    prec = bucket.precision
    return (
        bucket.params,
        grads,
        bucket.exp_avgs,
        bucket.exp_avg_sqs,
        bucket.max_exp_avg_sqs if bucket.max_exp_avg_sqs is not None else [],
        bucket.steps,
        ctrl.k,
        schedule_table(bucket, ctrl),
        ctrl.stats,
        ctrl.max_norm,
        _float32(ctrl.inv_scale),
        _float32(ctrl.found_inf),
        0.0 if isinstance(hyper.lr, Tensor) else hyper.lr,
        hyper.beta1,
        hyper.beta2,
        hyper.eps,
        hyper.weight_decay,
        hyper.maximize,
        prec.master if prec is not None and prec.master is not None else [],
        prec.remainder if prec is not None and prec.remainder is not None else [],
    )


def update_kwargs(
    bucket: Bucket, hyper: GroupHyper, applied_lr: Tensor | None, fold: FoldedUpdate | None = None
) -> dict[str, object]:
    """Keyword arguments of ``torch.ops.fusedlr.adamw_update``: the tensor LR, the applied-LR output,
    stochastic rounding's key of ``bucket.precision`` and the folded step's arguments (``fold``)."""
    kwargs: dict[str, object] = {
        "lr_tensor": hyper.lr if isinstance(hyper.lr, Tensor) else None,
        "applied_lr": applied_lr,
    }
    if fold is not None:
        kwargs.update(
            lr_index=fold.group,
            scale=fold.scale,
            skip_nonfinite=fold.skip_nonfinite,
            advance=True,
            advance_k=fold.advance_k,
            norm_out=fold.norm_out,
            found_inf_out=fold.found_inf_out,
        )
    prec = bucket.precision
    if prec is not None:
        kwargs.update(
            pids=prec.pids if prec.stochastic else None,
            seed=prec.seed,
            stochastic=prec.stochastic,
        )
    return kwargs


def dtype_runs(buckets: Sequence[Bucket], grads: Sequence[list[Tensor]]) -> list[tuple[Bucket, list[Tensor]]]:
    """The gradients of several buckets by dtype (in the order of each dtype's first bucket, the buckets' order
    within it), each with the first bucket of its dtype (which caches that launch's table): what one pass-1
    launch per dtype reads."""
    runs: dict[torch.dtype, tuple[Bucket, list[Tensor]]] = {}
    for b, gs in zip(buckets, grads):
        if gs:
            runs.setdefault(gs[0].dtype, (b, []))[1].extend(gs)
    return list(runs.values())


def launch_key(bucket: Bucket, grads: list[Tensor]) -> Hashable:
    """What the buckets of one launch set share (see ``update_set_args``): device, param, grad and moment dtypes,
    amsgrad and the low-precision mode (master kind, stochastic rounding, seed)."""
    prec = bucket.precision
    mode = None if prec is None else (prec.master is not None, prec.remainder is not None, prec.stochastic, prec.seed)
    grad_dtype = grads[0].dtype if grads else None
    amsgrad = bucket.max_exp_avg_sqs is not None
    return (bucket.device, bucket.params[0].dtype, grad_dtype, bucket.exp_avgs[0].dtype, amsgrad, mode)


def check_launch_set(buckets: Sequence[Bucket], grads: Sequence[list[Tensor]], backend: str) -> None:
    """Refuse a launch set whose buckets do not share one ``launch_key``."""
    if len({launch_key(b, gs) for b, gs in zip(buckets, grads)}) != 1:
        raise ValueError(f"fusedlr backend={backend!r}: the buckets of a launch set must share their launch_key")


def checked_update_set_args(
    buckets: Sequence[Bucket],
    grads: Sequence[list[Tensor]],
    hypers: Sequence[GroupHyper],
    ctrl: StepControl,
    applied_lr: Tensor,
    folds: Sequence[FoldedUpdate],
    backend: str,
) -> dict[str, object]:
    """``update_set_args`` of a launch set of ``backend`` (``cpu``/``cuda``), checked: one ``launch_key``, every
    bucket one the kernels run (``check_folds``); the gradients as the kernels read them (``kernel_grads``)."""
    check_launch_set(buckets, grads, backend)
    for b, gs, fold in zip(buckets, grads, folds):
        check_folds(b, gs, backend, fold)
    kernel = [kernel_grads(b, gs) for b, gs in zip(buckets, grads)]
    return update_set_args(buckets, kernel, hypers, ctrl, applied_lr, folds)


def update_set_args(
    buckets: Sequence[Bucket],
    grads: Sequence[list[Tensor]],
    hypers: Sequence[GroupHyper],
    ctrl: StepControl,
    applied_lr: Tensor,
    folds: Sequence[FoldedUpdate],
) -> dict[str, object]:
    """Arguments of ``torch.ops.fusedlr.adamw_update_set`` (schema: csrc/bindings.cpp) for the folded update of
    ``buckets`` (one launch set, ``launch_key``; ``grads`` as the kernels read them) in one op call: their lists
    concatenated, one segment per bucket with its hyperparameters, steps and ``applied_lr`` entry
    (``folds[i].group``); the step-level outputs are those of the last fold (the others have none)."""
    if any(f.advance_k or f.norm_out is not None or f.found_inf_out is not None for f in folds[:-1]):
        raise ValueError("fusedlr: only the last update of a launch set writes the step-level outputs")
    last = folds[-1]
    precs = [b.precision for b in buckets]

    def per_param(get) -> list[Tensor]:
        return [t for b in buckets for t in (get(b) or [])]

    return dict(
        params=per_param(lambda b: b.params),
        grads=[g for gs in grads for g in gs],
        exp_avgs=per_param(lambda b: b.exp_avgs),
        exp_avg_sqs=per_param(lambda b: b.exp_avg_sqs),
        max_exp_avg_sqs=per_param(lambda b: b.max_exp_avg_sqs),
        masters=per_param(lambda b: b.precision and b.precision.master),
        remainders=per_param(lambda b: b.precision and b.precision.remainder),
        steps=[b.steps for b in buckets],
        k=ctrl.k,
        applied_lr=applied_lr,
        sizes=[len(b.params) for b in buckets],
        groups=[f.group for f in folds],
        lr=[0.0 if isinstance(h.lr, Tensor) else h.lr for h in hypers],
        beta1=[h.beta1 for h in hypers],
        beta2=[h.beta2 for h in hypers],
        eps=[h.eps for h in hypers],
        weight_decay=[h.weight_decay for h in hypers],
        maximize=[int(h.maximize) for h in hypers],
        lr_tensors=[h.lr if isinstance(h.lr, Tensor) else None for h in hypers],
        pids=[p.pids for p in precs if p is not None and p.stochastic],
        schedule=schedule_table(buckets[0], ctrl),
        stats=ctrl.stats,
        max_norm=ctrl.max_norm,
        found_inf=_float32(ctrl.found_inf),
        scale=last.scale,
        skip_nonfinite=last.skip_nonfinite,
        advance_k=last.advance_k,
        norm_out=last.norm_out,
        found_inf_out=last.found_inf_out,
        seed=precs[0].seed if precs[0] is not None else 0,
        stochastic=precs[0] is not None and precs[0].stochastic,
    )
