"""The pure-PyTorch backend: the specification of fusedlr's math, and the CPU fallback.

Written for clarity and exactness: every formula appears once, step-index scalars (LR, bias
corrections, clip coefficient) are float64 device tensors, elementwise math runs in the math
dtype (float32, or float64 for float64 parameters) whatever the parameter and state dtypes, and
nothing reads a device value on the host, so it never syncs. Tensors are processed with
``torch._foreach_*`` ops, a chunk of a bucket at a time, in place where they are in the math dtype
(as fast as torch's foreach AdamW on the CPU; within rounding of the formulas below, whose
evaluation order follows torch's: ``v = v * beta2 + (1 - beta2) * (g * g)`` and
``p = p * decay - m / (denom / step_size)``).

Pass 1, ``grad_stats``: ``out[0] += sum over tensors of (norm(g) * inv_scale)^2`` with ``norm(g)``
each tensor's L2 norm accumulated in float32 (float64 for float64 grads), ``out[1] += count of
non-finite gradient elements``.
Pass 2, ``adamw_update``, per element, with ``lr_t = lr * sched(k)``, ``t = steps[i]`` and
``c = min(1, max_norm / (sqrt(stats[0]) + 1e-6))`` (NaN propagates)::

    g = grad * inv_scale * c            (negated when maximize)
    p = p * (1 - lr_t * weight_decay)
    m = lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    v_max = max(v_max, v)               (amsgrad; the denominator then uses v_max)
    p = p - lr_t / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

and nothing at all changes when ``found_inf > 0`` (the reference runs such a step with zeroed
gradients, step size 0 and decays 1, which rewrites every finite value with itself). ``applied_lr``
(when given) receives ``lr_t`` when the update is applied.

Low-precision modes (``bucket.precision``; exact bit-level spec in ``fusedlr.precision``): ``p`` on
the right-hand side is the fp32 master when there is one (``master_param``, or the param joined with
its ``master_remainder``), and the master receives the new ``p`` exactly. Moments stored in bfloat16
are read as float32; the new ``m``, ``v`` (and ``v_max``) are used unrounded for this update and
stored rounded. Every float32 value stored into a 16-bit tensor is rounded to nearest (even), except:
into a bfloat16 param without master or a bfloat16 moment when ``stochastic_rounding`` (stochastic
rounding, random bits from the parameter's key, step and the element's offset), and into a param
with a remainder (nearest, ties away from zero, so that the remainder recovers the master).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from . import precision
from .bucket import Bucket
from .control import CLIP_EPS, GroupHyper, StepControl
from .precision import BucketPrecision, Streams

__all__ = ["grad_stats", "adamw_update", "scheduled_lr", "clip_coefficient", "NAME"]

NAME = "torch"

#: Elements per ``_foreach`` chunk: bounds the temporaries of a step to a few times this.
CHUNK_NUMEL = 1 << 24


def available(device: torch.device) -> str | None:
    """None: usable on ``device`` (always)."""
    return None


def _math_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def grad_stats(bucket: Bucket, grads: list[Tensor], inv_scale: Tensor | None, out: Tensor) -> None:
    """Pass 1: accumulate the sum of squares of the unscaled grads and the non-finite count into ``out``.

    Each tensor's squares are summed in float32 (the kernels' accumulation type), tensor by tensor.
    """
    for g in grads:
        gf = g.to(torch.float32)
        if inv_scale is not None:
            gf = gf * inv_scale
        out[0] += gf.square().sum()
        out[1] += (~torch.isfinite(g)).sum().to(torch.float32)


def scheduled_lr(lr: float | Tensor, ctrl: StepControl) -> Tensor:
    """The applied LR ``lr * sched(k)`` as a float64 0-d tensor on the device (``lr``: a float, or a
    1-element tensor read on the device, so filling it in place changes the next step's LR)."""
    if isinstance(lr, Tensor):
        base = lr.to(torch.float64).reshape(())
    else:
        base = torch.full((), lr, dtype=torch.float64, device=ctrl.k.device)
    return base if ctrl.schedule is None else base * ctrl.schedule(ctrl.k, ctrl.schedule_table)


def clip_coefficient(ctrl: StepControl) -> Tensor | None:
    """``max_norm / (norm + 1e-6)`` clamped to 1 (NaN stays NaN, as in ``clip_grad_norm_``), or None."""
    if ctrl.max_norm is None:
        return None
    assert ctrl.stats is not None, "clipping needs the reduction pass"
    coef = ctrl.max_norm / (ctrl.stats[0].to(torch.float64).sqrt() + CLIP_EPS)
    return torch.where(coef >= 1.0, torch.ones_like(coef), coef)


def _chunks(tensors: list[Tensor]) -> Iterator[list[int]]:
    """Consecutive index ranges of ``tensors`` holding about ``CHUNK_NUMEL`` elements each."""
    chunk: list[int] = []
    numel = 0
    for i, t in enumerate(tensors):
        chunk.append(i)
        numel += t.numel()
        if numel >= CHUNK_NUMEL:
            yield chunk
            chunk, numel = [], 0
    if chunk:
        yield chunk


def _rounded(dst: Tensor, value: Tensor, prec: BucketPrecision | None, key: Tensor | None, stream: int) -> Tensor:
    """``value`` (math dtype) as it is stored into ``dst``: unchanged, stochastically rounded or to nearest."""
    if dst.dtype == value.dtype:
        return value
    if dst.dtype == torch.bfloat16 and prec is not None and prec.stochastic and key is not None:
        bits = precision.random_bits(key, stream, precision.element_index(dst))
        return precision.stochastic_round_bf16(value.to(torch.float32), bits)
    return value.to(dst.dtype)


def adamw_update(
    bucket: Bucket, grads: list[Tensor], hyper: GroupHyper, ctrl: StepControl, applied_lr: Tensor | None = None
) -> None:
    """Pass 2: one AdamW update of every tensor of ``bucket`` (see the module docstring).

    Tensors already in the math dtype are updated in place, the others through a math-dtype copy
    stored back rounded. A skipped step (``found_inf > 0``) runs with gradients zeroed, the LR-side
    scalars at 0 and the decays at 1: every formula then rewrites each (finite) value with itself.
    ``applied_lr``: a 0-d float64 device tensor that receives ``lr_t`` when the update is applied.
    """
    dt = _math_dtype(bucket.params[0])  # a bucket holds one param dtype
    lr = scheduled_lr(hyper.lr, ctrl)
    scale = clip_coefficient(ctrl)
    if ctrl.inv_scale is not None:
        scale = ctrl.inv_scale.to(torch.float64) if scale is None else scale * ctrl.inv_scale
    if hyper.maximize:
        scale = -1.0 if scale is None else -scale
    gscale = None if scale is None else torch.as_tensor(scale, dtype=torch.float64).to(dt)
    # Per-tensor scalars of the whole bucket at once: t = this update's step of each tensor.
    t = bucket.steps.to(torch.float64)
    step_size = lr / (1.0 - torch.pow(hyper.beta1, t))
    bias2_sqrt = torch.sqrt(1.0 - torch.pow(hyper.beta2, t))
    decay = 1.0 - lr * hyper.weight_decay
    skip = None if ctrl.found_inf is None else ctrl.found_inf > 0
    weight1: float | list[Tensor] = 1.0 - hyper.beta1
    beta2: float | Tensor = hyper.beta2
    if skip is not None:
        zero, one = torch.zeros((), dtype=dt, device=t.device), torch.ones((), dtype=dt, device=t.device)
        step_size = torch.where(skip, 0.0, step_size)
        bias2_sqrt = torch.where(skip, 1.0, bias2_sqrt)  # a skipped first step has t = 0
        decay = torch.where(skip, 1.0, decay)
        weight1 = [torch.where(skip, zero, torch.full_like(zero, 1.0 - hyper.beta1))] * len(bucket.params)
        beta2 = torch.where(skip, one, torch.full_like(one, hyper.beta2))
    step_size_dt = step_size.to(dt).unbind()
    bias2_sqrt_dt = bias2_sqrt.to(dt).unbind()
    decay = decay.to(dt)
    prec = bucket.precision
    keys = None
    if prec is not None and prec.stochastic:
        keys = precision.tensor_keys(prec.seed, prec.pids, bucket.steps).unbind()

    def key(i: int) -> Tensor | None:
        return None if keys is None else keys[i]

    for idx in _chunks(bucket.params):
        params = [bucket.params[i] for i in idx]
        if prec is not None and prec.master is not None:
            p32 = [prec.master[i] for i in idx]
        elif prec is not None and prec.remainder is not None:
            p32 = [precision.join_master(bucket.params[i], prec.remainder[i]) for i in idx]
        else:
            p32 = [p.to(dt) for p in params]
        g32 = [grads[i].to(dt) for i in idx]
        if gscale is not None:
            g32 = torch._foreach_mul(g32, gscale)
        if skip is not None:  # a skipped step's grads may be inf/NaN
            if gscale is None:
                g32 = [torch.where(skip, 0.0, g) for g in g32]
            else:  # g32 is our own copy: in place
                g32 = [g.masked_fill_(skip, 0.0) for g in g32]
        ms = [bucket.exp_avgs[i] for i in idx]
        vs = [bucket.exp_avg_sqs[i] for i in idx]
        m32, v32 = [m.to(dt) for m in ms], [v.to(dt) for v in vs]
        torch._foreach_lerp_(m32, g32, weight1 if isinstance(weight1, float) else weight1[: len(idx)])
        torch._foreach_mul_(v32, beta2)
        torch._foreach_addcmul_(v32, g32, g32, value=1.0 - hyper.beta2)
        stores = [(ms, m32, Streams.EXP_AVG), (vs, v32, Streams.EXP_AVG_SQ)]
        vden = v32
        if bucket.max_exp_avg_sqs is not None:
            vmaxs = [bucket.max_exp_avg_sqs[i] for i in idx]
            vden = [v.to(dt) for v in vmaxs]
            torch._foreach_maximum_(vden, v32)
            if skip is not None:  # a skipped step keeps a rounded v_max even where the (rounded) v exceeds it
                vden = [new if new is old else torch.where(skip, old, new) for old, new in zip(vmaxs, vden)]
            stores.append((vmaxs, vden, Streams.MAX_EXP_AVG_SQ))
        denom = torch._foreach_sqrt(vden)
        torch._foreach_div_(denom, [bias2_sqrt_dt[i] for i in idx])
        torch._foreach_add_(denom, hyper.eps)
        torch._foreach_div_(denom, [step_size_dt[i] for i in idx])  # p -= m / (denom / step_size)
        torch._foreach_mul_(p32, decay)
        torch._foreach_addcdiv_(p32, m32, denom, value=-1.0)

        dsts: list[Tensor] = []
        values: list[Tensor] = []
        for olds, news, stream in stores:
            for i, old, new in zip(idx, olds, news):
                if new is not old:
                    dsts.append(old)
                    values.append(_rounded(old, new, prec, key(i), stream))
        if prec is not None and prec.master is not None:
            dsts += params
            values += p32
        elif prec is not None and prec.remainder is not None:
            for i, p, new in zip(idx, params, p32):
                high, low = precision.split_master(new)
                dsts += [p, prec.remainder[i]]
                values += [high, low]
        else:
            for i, p, new in zip(idx, params, p32):
                if new is not p:
                    dsts.append(p)
                    values.append(_rounded(p, new, prec, key(i), Streams.PARAM))
        if dsts:
            torch._foreach_copy_(dsts, values)
    if applied_lr is not None:
        applied_lr.copy_(lr if skip is None else torch.where(skip, applied_lr, lr))
