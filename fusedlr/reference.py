"""The pure-PyTorch backend: the specification of fusedlr's math, and the CPU fallback.

Written for clarity and exactness: every formula appears once, step-index scalars (LR, bias
corrections, clip coefficient) are float64 device tensors, elementwise math runs in the math
dtype (float32, or float64 for float64 parameters) whatever the parameter and state dtypes, and
nothing reads a device value on the host, so it never syncs. Tensors are processed with
``torch._foreach_*`` ops, a chunk of a bucket at a time.

Pass 1, ``grad_stats``: ``out[0] += sum over tensors of (norm(g) * inv_scale)^2`` with ``norm(g)``
each tensor's L2 norm accumulated in float32 (float64 for float64 grads), ``out[1] += number of
tensors whose norm is not finite`` (a non-finite element, or a norm beyond the float32 range).
Pass 2, ``adamw_update``, per element, with ``lr_t = lr * sched(k)``, ``t = steps[i]`` and
``c = min(1, max_norm / (sqrt(stats[0]) + 1e-6))`` (NaN propagates)::

    g = grad * inv_scale * c            (negated when maximize)
    p = p * (1 - lr_t * weight_decay)
    m = lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    v_max = max(v_max, v)               (amsgrad; the denominator then uses v_max)
    p = p - lr_t / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

and nothing at all is written when ``found_inf > 0``.

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
    """Pass 1: accumulate the sum of squares of the unscaled grads and the non-finite count into ``out``."""
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads, 2, dtype=_math_dtype(grads[0]))).to(torch.float32)
    scaled = norms if inv_scale is None else norms * inv_scale
    out[0] += scaled.square().sum()
    out[1] += (~torch.isfinite(norms)).sum().to(torch.float32)


def scheduled_lr(lr: float, ctrl: StepControl) -> Tensor:
    """The applied LR ``lr * sched(k)`` as a float64 0-d tensor on the device."""
    if ctrl.schedule is None:
        return torch.full((), lr, dtype=torch.float64, device=ctrl.k.device)
    return lr * ctrl.schedule(ctrl.k)


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


def _store(dsts: list[Tensor], values: list[Tensor], skip: Tensor | None) -> None:
    """Write ``values`` into ``dsts``, or nothing at all where ``skip`` (a 0-d bool device tensor) is true."""
    if skip is None:
        torch._foreach_copy_(dsts, values)
        return
    for dst, value in zip(dsts, values):
        dst.copy_(torch.where(skip, dst, value))


def adamw_update(bucket: Bucket, grads: list[Tensor], hyper: GroupHyper, ctrl: StepControl) -> None:
    """Pass 2: one AdamW update of every tensor of ``bucket`` (see the module docstring)."""
    dt = _math_dtype(bucket.params[0])  # a bucket holds one param dtype
    lr = scheduled_lr(hyper.lr, ctrl)
    scale = clip_coefficient(ctrl)
    if ctrl.inv_scale is not None:
        scale = ctrl.inv_scale.to(torch.float64) if scale is None else scale * ctrl.inv_scale
    if hyper.maximize:
        scale = -1.0 if scale is None else -scale
    skip = None if ctrl.found_inf is None else ctrl.found_inf > 0
    # Per-tensor scalars of the whole bucket at once: t = this update's step of each tensor.
    t = bucket.steps.to(torch.float64)
    step_size = (lr / (1.0 - torch.pow(hyper.beta1, t))).to(dt).unbind()
    bias2_sqrt = torch.sqrt(1.0 - torch.pow(hyper.beta2, t)).to(dt).unbind()
    decay = (1.0 - lr * hyper.weight_decay).to(dt)
    gscale = None if scale is None else torch.as_tensor(scale, dtype=torch.float64).to(dt)
    prec = bucket.precision
    keys = None
    if prec is not None and prec.stochastic:
        keys = precision.tensor_keys(prec.seed, prec.pids, bucket.steps).unbind()

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
        ms = [bucket.exp_avgs[i] for i in idx]
        vs = [bucket.exp_avg_sqs[i] for i in idx]
        m_new = torch._foreach_lerp([m.to(dt) for m in ms], g32, 1.0 - hyper.beta1)
        v_new = torch._foreach_mul([v.to(dt) for v in vs], hyper.beta2)
        g2 = torch._foreach_mul(g32, 1.0 - hyper.beta2)
        torch._foreach_mul_(g2, g32)
        torch._foreach_add_(v_new, g2)
        moments = [(ms, m_new, Streams.EXP_AVG), (vs, v_new, Streams.EXP_AVG_SQ)]
        denom = v_new
        if bucket.max_exp_avg_sqs is not None:
            vmaxs = [bucket.max_exp_avg_sqs[i] for i in idx]
            denom = torch._foreach_maximum([v.to(dt) for v in vmaxs], v_new)
            moments.append((vmaxs, denom, Streams.MAX_EXP_AVG_SQ))
        denom = torch._foreach_sqrt(denom)
        torch._foreach_div_(denom, [bias2_sqrt[i] for i in idx])
        torch._foreach_add_(denom, hyper.eps)
        step = torch._foreach_div(m_new, denom)
        torch._foreach_mul_(step, [step_size[i] for i in idx])
        p_new = torch._foreach_mul(p32, decay)
        torch._foreach_sub_(p_new, step)

        dsts: list[Tensor] = []
        values: list[Tensor] = []
        for olds, news, stream in moments:
            dsts += olds
            values += [_rounded(o, n, prec, None if keys is None else keys[i], stream) for i, o, n in zip(idx, olds, news)]
        if prec is not None and prec.master is not None:
            dsts += p32 + params
            values += list(p_new) + [v.to(p.dtype) for p, v in zip(params, p_new)]
        elif prec is not None and prec.remainder is not None:
            halves = [precision.split_master(v) for v in p_new]
            dsts += params + [prec.remainder[i] for i in idx]
            values += [h for h, _ in halves] + [r for _, r in halves]
        else:
            dsts += params
            values += [
                _rounded(p, v, prec, None if keys is None else keys[i], Streams.PARAM)
                for i, p, v in zip(idx, params, p_new)
            ]
        _store(dsts, values, skip)
