"""The pure-PyTorch backend: the specification of fusedlr's math, and the CPU fallback.

Written for clarity and exactness: every formula appears once, step-index scalars (LR, bias
corrections, clip coefficient) are float64 device tensors, elementwise math runs in the state
dtype (float32, or float64 for float64 parameters) whatever the parameter dtype, and nothing
reads a device value on the host, so it never syncs.

Pass 1, ``grad_stats``: ``out[0] += sum((g * inv_scale)^2)``, ``out[1] += count of non-finite
gradients`` (accumulated in float32 whatever the grad dtype).
Pass 2, ``adamw_update``, per element, with ``lr_t = lr * sched(k)``, ``t = steps[i]`` and
``c = min(1, max_norm / (sqrt(stats[0]) + 1e-6))`` (NaN propagates)::

    g = grad * inv_scale * c            (negated when maximize)
    p = p * (1 - lr_t * weight_decay)
    m = lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    v_max = max(v_max, v)               (amsgrad; the denominator then uses v_max)
    p = p - lr_t / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

and nothing at all is written when ``found_inf > 0``. ``applied_lr`` (when given) receives ``lr_t``
when the update is applied.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bucket import Bucket
from .control import CLIP_EPS, GroupHyper, StepControl

__all__ = ["grad_stats", "adamw_update", "scheduled_lr", "clip_coefficient", "NAME"]

NAME = "torch"


def available(device: torch.device) -> str | None:
    """None: usable on ``device`` (always)."""
    return None


def _math_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def grad_stats(bucket: Bucket, grads: list[Tensor], inv_scale: Tensor | None, out: Tensor) -> None:
    """Pass 1: accumulate the sum of squares of the unscaled grads and the non-finite count into ``out``."""
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


def adamw_update(
    bucket: Bucket, grads: list[Tensor], hyper: GroupHyper, ctrl: StepControl, applied_lr: Tensor | None = None
) -> None:
    """Pass 2: one AdamW update of every tensor of ``bucket`` (see the module docstring).

    ``applied_lr``: a 0-d float64 device tensor that receives ``lr_t`` when the update is applied.
    """
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
    step_size = (lr / (1.0 - torch.pow(hyper.beta1, t))).to(dt)
    bias2_sqrt = torch.sqrt(1.0 - torch.pow(hyper.beta2, t)).to(dt)
    decay = (1.0 - lr * hyper.weight_decay).to(dt)
    gscale = None if scale is None else torch.as_tensor(scale, dtype=torch.float64).to(dt)
    for i, (p, g) in enumerate(zip(bucket.params, grads)):
        m, v = bucket.exp_avgs[i], bucket.exp_avg_sqs[i]
        gf = g.to(dt) if gscale is None else g.to(dt) * gscale
        m_new = torch.lerp(m, gf, 1.0 - hyper.beta1)
        v_new = v * hyper.beta2 + (1.0 - hyper.beta2) * gf * gf
        denom_src = v_new
        new = [(m, m_new), (v, v_new)]
        if bucket.max_exp_avg_sqs is not None:
            vmax = bucket.max_exp_avg_sqs[i]
            denom_src = torch.maximum(vmax, v_new)
            new.append((vmax, denom_src))
        denom = denom_src.sqrt() / bias2_sqrt[i] + hyper.eps
        p_new = p.to(dt) * decay - step_size[i] * (m_new / denom)
        new.append((p, p_new.to(p.dtype)))
        for dst, val in new:
            dst.copy_(val if skip is None else torch.where(skip, dst, val))
    if applied_lr is not None:
        applied_lr.copy_(lr if skip is None else torch.where(skip, applied_lr, lr))
