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
each tensor's L2 norm accumulated in float32, ``out[1] += number of tensors holding a non-finite element``
(positive exactly when one is, as the kernels' count of such elements).
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

Around these two passes a step (``fusedlr.AdamW``) runs small ops, which a folding backend's kernels do
themselves (``fusedlr.control.FoldedUpdate``) with the same values: ``inv_scale`` is GradScaler's
``float32(1 / float64(scale))``; with GradScaler, ``found_inf = float32(stats[1] > 0)``; ``steps`` are
advanced by 1 before the update reads them and ``k`` by 1 after it, both only when it is applied; the
optimizer's ``grad_norm`` receives ``sqrt(stats[0])`` (float32), also on a skipped step.

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

from collections.abc import Callable

import torch
from torch import Tensor

from . import precision
from . import reference_chunks as chunks
from .bucket import Bucket
from .control import CLIP_EPS, GroupHyper, StepControl
from .precision import BucketPrecision

__all__ = ["grad_stats", "adamw_update", "prepare_update", "scheduled_lr", "clip_coefficient", "NAME"]

NAME = "torch"

#: Elements per piece whose norm pass 1 takes in float32 (see ``grad_stats``).
NORM_PIECE = 1 << 14


def available(device: torch.device) -> str | None:
    """None: usable on ``device`` (always)."""
    return None


def _math_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def grad_stats(bucket: Bucket, grads: list[Tensor], inv_scale: Tensor | None, out: Tensor) -> None:
    """Pass 1: accumulate the sum of squares of the unscaled grads and the non-finite count into ``out``.

    Foreach ops over pieces of at most ``NORM_PIECE`` elements of each grad (views of its float32 form):
    ``torch._foreach_norm`` gives each piece's L2 norm accumulated in float64 (a float32 square is exact in
    float64), and the squares of the (unscaled) norms are summed in float64 and rounded once to float32.
    So the total is the exact sum of squares to about 1e-15, rounded: bit for bit the kernels' float32 sum
    when that sum is exact (gradients of few significant bits, as the bitwise tests use), and within
    their float32 accumulation error (~1e-7 relative) otherwise. Why pieces: torch's norm on the CPU
    accumulates each vector lane sequentially, so its error grows with the length.

    ``out[1]`` grows by the number of pieces holding a non-finite element (the kernels add the number of
    such elements; either is positive exactly when one is, which is all the step reads): those whose norm is
    not finite, since a float64 sum of float32 squares cannot overflow. Float64 grads, which may be too
    large for float32 and still finite, are checked on their own sums instead. A grad of at most
    ``NORM_PIECE`` elements is its own piece (no view made: the per-tensor cost matters for many small
    tensors).
    """
    if not grads:
        return
    pieces = [piece for g in grads for piece in _norm_pieces(g)]
    norms = torch.stack(torch._foreach_norm(pieces, 2, dtype=torch.float64))
    if grads[0].dtype == torch.float64:  # a bucket has one grad dtype
        finite = torch.isfinite(torch.stack([g.sum() for g in grads]))
    else:
        finite = torch.isfinite(norms)
    if inv_scale is not None:
        norms = norms * inv_scale.to(torch.float64)
    out[0] += norms.square().sum().to(torch.float32)
    out[1] += (~finite).sum().to(torch.float32)


def _norm_pieces(g: Tensor) -> list[Tensor]:
    """``g`` in float32, in pieces of at most ``NORM_PIECE`` elements (``g`` itself when it is one)."""
    g32 = g if g.dtype == torch.float32 else g.to(torch.float32)
    return [g32] if g32.numel() <= NORM_PIECE else list(g32.reshape(-1).split(NORM_PIECE))


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


def _rounded(
    dst: Tensor, value: Tensor, prec: BucketPrecision | None, key: Tensor | None, stream: int | None
) -> Tensor:
    """``value`` (math dtype) as it is stored into ``dst``: unchanged, stochastically rounded (a bf16 ``dst``
    with ``prec.stochastic`` and a ``stream``) or to nearest."""
    if dst.dtype == value.dtype:
        return value
    if dst.dtype == torch.bfloat16 and prec is not None and prec.stochastic and stream is not None:
        assert key is not None
        bits = precision.random_bits(key, stream, precision.element_index(dst))
        return precision.stochastic_round_bf16(value.to(torch.float32), bits)
    return value.to(dst.dtype)


def prepare_update(
    bucket: Bucket, grads: list[Tensor], hyper: GroupHyper, ctrl: StepControl, applied_lr: Tensor | None = None
) -> Callable[[], None]:
    """Pass 2 in two phases: this call does all that can fail (the per-tensor scalars, every allocation)
    and modifies nothing; the function it returns (the commit) runs the update of every tensor of
    ``bucket`` (see the module docstring) with in-place foreach ops and copies, allocating nothing.

    Tensors already in the math dtype are updated in place, the others through a math-dtype scratch copy
    stored back to nearest. Scratch (those copies, scaled gradients, the denominator) is one buffer of a
    chunk's size that every chunk reuses. With stochastic rounding or a remainder the stored values need
    fresh tensors (random bits, bit splits), so the whole update of such a bucket is computed here, in
    scratch of its own, and the commit only copies it in. A skipped step (``found_inf > 0``) runs with
    gradients zeroed, the LR-side scalars at 0 and the decays at 1: every formula then rewrites each
    (finite) value with itself. ``applied_lr``: a 0-d float64 device tensor that receives ``lr_t``
    when the update is applied.
    """
    dt = _math_dtype(bucket.params[0])  # a bucket holds one param dtype
    device = bucket.steps.device
    lr = scheduled_lr(hyper.lr, ctrl)
    scale = clip_coefficient(ctrl)
    if ctrl.inv_scale is not None:
        scale = ctrl.inv_scale.to(torch.float64) if scale is None else scale * ctrl.inv_scale
    if hyper.maximize:
        scale = -1.0 if scale is None else -scale
    gscale = None if scale is None else torch.as_tensor(scale, dtype=torch.float64, device=device).to(dt)
    # Per-tensor scalars of the whole bucket at once: t = this update's step of each tensor.
    t = bucket.steps.to(torch.float64)
    step_size = lr / (1.0 - torch.pow(hyper.beta1, t))
    bias2_sqrt = torch.sqrt(1.0 - torch.pow(hyper.beta2, t))
    decay = 1.0 - lr * hyper.weight_decay
    skip = None if ctrl.found_inf is None else ctrl.found_inf > 0
    weight1: float | list[Tensor] = 1.0 - hyper.beta1
    beta2: float | Tensor = hyper.beta2
    if skip is not None:
        zero, one = torch.zeros((), dtype=dt, device=device), torch.ones((), dtype=dt, device=device)
        step_size = torch.where(skip, 0.0, step_size)
        bias2_sqrt = torch.where(skip, 1.0, bias2_sqrt)  # a skipped first step has t = 0
        decay = torch.where(skip, 1.0, decay)
        weight1 = [torch.where(skip, zero, torch.full_like(zero, 1.0 - hyper.beta1))] * len(bucket.params)
        beta2 = torch.where(skip, one, torch.full_like(one, hyper.beta2))
    step_size_dt = step_size.to(dt).unbind()
    bias2_sqrt_dt = bias2_sqrt.to(dt).unbind()
    decay = decay.to(dt)
    new_lr = None if applied_lr is None else lr if skip is None else torch.where(skip, applied_lr, lr)

    def run(c: chunks.Chunk) -> None:
        """The update of one chunk, in place on its math-dtype tensors."""
        if c.loads:
            torch._foreach_copy_([s for s, _ in c.loads], [src for _, src in c.loads])
        if c.scaled is not None:
            for s, g in zip(c.g32, c.scaled):
                torch.mul(g, gscale, out=s)
        elif gscale is not None:
            torch._foreach_mul_(c.g32, gscale)
        if skip is not None:  # a skipped step's grads may be inf/NaN
            for g in c.g32:
                g.masked_fill_(skip, 0.0)
        torch._foreach_lerp_(c.m32, c.g32, weight1 if isinstance(weight1, float) else weight1[: len(c.idx)])
        torch._foreach_mul_(c.v32, beta2)
        torch._foreach_addcmul_(c.v32, c.g32, c.g32, value=1.0 - hyper.beta2)
        vden = c.v32
        if c.vmax32 is not None:
            if skip is None:
                torch._foreach_maximum_(c.vmax32, c.v32)
            else:  # stochastically rounded, a stored v may exceed its stored v_max: a skipped step keeps v_max
                for d, v in zip(c.denom, c.v32):
                    d.copy_(v).masked_fill_(skip, 0.0)
                torch._foreach_maximum_(c.vmax32, c.denom)
            vden = c.vmax32
        torch._foreach_copy_(c.denom, vden)
        torch._foreach_sqrt_(c.denom)
        torch._foreach_div_(c.denom, [bias2_sqrt_dt[i] for i in c.idx])
        torch._foreach_add_(c.denom, hyper.eps)
        torch._foreach_div_(c.denom, [step_size_dt[i] for i in c.idx])  # p -= m / (denom / step_size)
        torch._foreach_mul_(c.p32, decay)
        torch._foreach_addcdiv_(c.p32, c.m32, c.denom, value=-1.0)

    prec = bucket.precision
    private = prec is not None and (prec.stochastic or prec.remainder is not None)
    scratch_grads = grads[0].dtype != dt or gscale is not None or skip is not None
    scale_into = gscale is not None and grads[0].dtype == dt  # else loaded (converted), then scaled in place
    work = chunks.plan(bucket, grads, dt, scratch_grads=scratch_grads, private=private, scale_into=scale_into)
    if private:
        assert prec is not None
        keys = precision.tensor_keys(prec.seed, prec.pids, bucket.steps).unbind() if prec.stochastic else None
        dsts: list[Tensor] = []
        values: list[Tensor] = []
        for c in work:
            run(c)
            for dst, result, stream, i in c.stores:
                dsts.append(dst)
                values.append(_rounded(dst, result, prec, None if keys is None else keys[i], stream))
            if prec.remainder is not None:
                for i, new in zip(c.idx, c.p32):
                    high, low = precision.split_master(new)
                    dsts += [bucket.params[i], prec.remainder[i]]
                    values += [high, low]

        def commit() -> None:
            torch._foreach_copy_(dsts, values)
            if applied_lr is not None:
                applied_lr.copy_(new_lr)

        return commit

    def commit() -> None:
        for c in work:
            run(c)
            if c.stores:
                torch._foreach_copy_([dst for dst, *_ in c.stores], [result for _, result, *_ in c.stores])
        if applied_lr is not None:
            applied_lr.copy_(new_lr)

    return commit


def adamw_update(
    bucket: Bucket, grads: list[Tensor], hyper: GroupHyper, ctrl: StepControl, applied_lr: Tensor | None = None
) -> None:
    """Pass 2 at once: ``prepare_update`` and its commit."""
    prepare_update(bucket, grads, hyper, ctrl, applied_lr)()
