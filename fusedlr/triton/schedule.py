"""In-kernel LR schedule: the multiplier ``sched(k)`` evaluated from the schedule table.

The table is ``Schedule.as_tensor()`` on the device: float64 ``[kind, *params]`` with the layout of
``fusedlr.schedules.Kind``; parameter ``j`` sits at ``table_ptr + 1 + j``. Everything is computed in
float64 scalars (one evaluation per program; cheap), following ``fusedlr.schedules.evaluate``
operation for operation, so results agree with the Python reference to float64 rounding.

The kind and the number of repeated entries (milestones, one-cycle phases) are compile-time
constants (``schedule_constexprs``): a schedule never changes during an optimizer's life.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..schedules import CHILD_STRIDE, COMPOSITE_KINDS, Kind, Schedule

__all__ = ["NO_SCHEDULE", "evaluate_multiplier", "schedule_constexprs", "schedule_multiplier"]

#: ``SCHED_KIND`` for "no schedule": the multiplier is 1 and the table is never read.
NO_SCHEDULE = -1
_STRIDE = tl.constexpr(CHILD_STRIDE)
#: A composite's ``SCHED_N`` packs its child count (low 4 bits) and, per child, 10 bits: kind | n << 5.
_CHILD_BITS = 10

@triton.jit
def _param(table_ptr, j: tl.constexpr):
    """Schedule parameter ``j`` (float64 scalar)."""
    return tl.load(table_ptr + 1 + j).to(tl.float64)


@triton.jit
def _pow(base, e):
    """``base ** e`` for ``base >= 0`` with torch.pow's special cases (``0**0 == 1``), float64."""
    safe = tl.where(base > 0.0, base, 1.0)
    r = tl.exp(e * tl.log(safe))
    r = tl.where(base > 0.0, r, tl.where(e > 0.0, 0.0, 1.0))
    return tl.where(e == 0.0, 1.0, r)


@triton.jit
def _clamp0(x):
    """``clamp(x, min=0)`` that keeps NaN, as torch.clamp does."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def _ramp(progress, shape, num_cycles, RISING: tl.constexpr):
    """Warmup-stable-decay ramp shapes (0 linear, 1 cosine, 2 1-sqrt) at ``progress``."""
    if RISING:
        lin = progress
        cos_ = 0.5 * (1.0 - tl.cos(3.141592653589793 * progress))
        sqr = 1.0 - tl.sqrt(tl.maximum(1.0 - progress, 0.0))
    else:
        lin = 1.0 - progress
        cos_ = 0.5 * (1.0 + tl.cos(3.141592653589793 * num_cycles * 2.0 * progress))
        sqr = 1.0 - tl.sqrt(tl.maximum(progress, 0.0))
    return tl.where(shape == 0.0, lin, tl.where(shape == 1.0, cos_, sqr))


@triton.jit
def _anneal(start, end, pct, linear):
    """One-cycle annealing from ``start`` to ``end`` at ``pct``: linear (``linear != 0``) or cosine."""
    lin = (end - start) * pct + start
    cos_ = end + (start - end) / 2.0 * (tl.cos(3.141592653589793 * pct) + 1.0)
    return tl.where(linear != 0.0, lin, cos_)


@triton.jit
def _cycle_start(t0, t_mult, n, denom):
    """The first update of warm-restart cycle ``n`` (an integer; rounded where pow is inexact)."""
    return tl.floor(t0 * (_pow(t_mult, n) - 1.0) / denom + 0.5)


@triton.jit
def _restarts(t0, t_mult, k):
    """CosineAnnealingWarmRestarts' ``(T_cur, T_i)`` at ``k`` (``fusedlr.schedules._restarts``)."""
    geometric = t_mult != 1.0
    denom = tl.where(geometric, t_mult - 1.0, 1.0)
    n = tl.floor(tl.log(k / t0 * denom + 1.0) / tl.log(tl.where(geometric, t_mult, 2.0)))
    n = tl.where(_cycle_start(t0, t_mult, n, denom) > k, n - 1.0, n)
    n = tl.where(_cycle_start(t0, t_mult, n + 1.0, denom) <= k, n + 1.0, n)
    start = _cycle_start(t0, t_mult, n, denom)
    t_cur = tl.where(geometric, k - start, k - t0 * tl.floor(k / t0))
    t_i = tl.where(geometric, _cycle_start(t0, t_mult, n + 1.0, denom) - start, t0)
    return t_cur, t_i


@triton.jit
def _cyclic(table_ptr, k):
    """torch CyclicLR relative to base_lr (``fusedlr.schedules._cyclic``)."""
    base = _param(table_ptr, 0)
    peak = _param(table_ptr, 1)
    total = _param(table_ptr, 3)
    mode = _param(table_ptr, 4)
    ratio = _param(table_ptr, 2) / total
    cycle = tl.floor(1.0 + k / total)
    x = 1.0 + k / total - cycle
    factor = tl.where(x <= ratio, x / ratio, (x - 1.0) / (ratio - 1.0))
    halving = _pow(tl.full((), 0.5, tl.float64), cycle - 1.0)
    scale = tl.where(mode == 0.0, 1.0, tl.where(mode == 1.0, halving, _pow(_param(table_ptr, 5), k)))
    return base + (peak - base) * factor * scale


@triton.jit
def schedule_multiplier(table_ptr, k, SCHED_KIND: tl.constexpr, SCHED_N: tl.constexpr):
    """The LR multiplier for update index ``k`` (float64 scalar, a non-negative integer value).

    ``table_ptr``: float64 schedule table ``[kind, *params]``. ``SCHED_KIND``: ``Kind`` value or
    ``NO_SCHEDULE``. ``SCHED_N``: milestone count (MULTISTEP), phase count (ONECYCLE), the packed
    children of a composite (``schedule_constexprs``), else 0. Returns a float64 scalar.
    """
    if SCHED_KIND == 20 or SCHED_KIND == 21:  # SEQUENTIAL, PRODUCT
        out = tl.full((), 1.0, tl.float64)
        for i in tl.static_range(SCHED_N & 15):
            code = (SCHED_N >> (4 + 10 * i)) & 1023  # _CHILD_BITS
            child = table_ptr + 2 + (SCHED_N & 15) + i * _STRIDE
            if SCHED_KIND == 21:
                out = out * _leaf_multiplier(child, k, code & 31, code >> 5)
            else:
                start = _param(table_ptr, 1 + i)
                value = _leaf_multiplier(child, tl.maximum(k - start, 0.0), code & 31, code >> 5)
                out = tl.where(k >= start, value, out)
    else:
        out = _leaf_multiplier(table_ptr, k, SCHED_KIND, SCHED_N)
    return out


@triton.jit
def _leaf_multiplier(table_ptr, k, SCHED_KIND: tl.constexpr, SCHED_N: tl.constexpr):
    """``schedule_multiplier`` of a leaf (non-composite) kind."""
    one = tl.full((), 1.0, tl.float64)
    if SCHED_KIND == -1 or SCHED_KIND == 0:
        out = one
    elif SCHED_KIND == 19:  # FACTOR
        out = _param(table_ptr, 0)
    elif SCHED_KIND == 13:  # COSINE_ANNEALING
        eta = _param(table_ptr, 1)
        out = eta + (1.0 - eta) * (1.0 + tl.cos(3.141592653589793 * k / _param(table_ptr, 0))) / 2.0
    elif SCHED_KIND == 14:  # COSINE_WARM_RESTARTS
        t_cur, t_i = _restarts(_param(table_ptr, 0), _param(table_ptr, 1), k)
        eta = _param(table_ptr, 2)
        out = eta + (1.0 - eta) * (1.0 + tl.cos(3.141592653589793 * t_cur / t_i)) / 2.0
    elif SCHED_KIND == 15:  # LINEAR_FACTOR
        start = _param(table_ptr, 0)
        total_iters = _param(table_ptr, 2)
        out = start + (_param(table_ptr, 1) - start) * tl.minimum(k, total_iters) / total_iters
    elif SCHED_KIND == 16:  # CONSTANT_FACTOR
        factor = _param(table_ptr, 0)
        out = factor + tl.where(k >= _param(table_ptr, 1), 1.0, 0.0) * (1.0 - factor)
    elif SCHED_KIND == 17:  # POLYNOMIAL_DECAY
        total_iters = _param(table_ptr, 0)
        out = _pow(1.0 - tl.minimum(k, total_iters) / total_iters, _param(table_ptr, 1))
    elif SCHED_KIND == 18:  # CYCLIC
        out = _cyclic(table_ptr, k)
    elif SCHED_KIND == 1:  # CONSTANT_WITH_WARMUP
        w = _param(table_ptr, 0)
        out = tl.where(k < w, k / tl.maximum(w, 1.0), one)
    elif SCHED_KIND == 11:  # EXPONENTIAL
        out = _pow(_param(table_ptr, 0), k)
    elif SCHED_KIND == 9:  # STEP
        out = _pow(_param(table_ptr, 1), tl.floor(k / _param(table_ptr, 0)))
    elif SCHED_KIND == 10:  # MULTISTEP
        passed = tl.full((), 0.0, tl.float64)
        for i in tl.static_range(SCHED_N):
            passed += tl.where(k >= _param(table_ptr, 2 + i), 1.0, 0.0)
        out = _pow(_param(table_ptr, 0), passed)
    elif SCHED_KIND == 12:  # ONECYCLE
        linear = _param(table_ptr, 0)
        k = tl.minimum(k, _param(table_ptr, 2 + 3 * (SCHED_N - 1)))  # past the last phase: hold
        out = tl.full((), 0.0, tl.float64)
        start_step = tl.full((), 0.0, tl.float64)
        done = tl.full((), 0.0, tl.float64)  # 1.0 once a phase has claimed k
        for i in tl.static_range(SCHED_N):
            end_step = _param(table_ptr, 2 + 3 * i)
            lo = _param(table_ptr, 3 + 3 * i)
            hi = _param(table_ptr, 4 + 3 * i)
            if i < SCHED_N - 1:
                here = (done == 0.0) & (k <= end_step)
            else:
                here = done == 0.0
            value = _anneal(lo, hi, (k - start_step) / (end_step - start_step), linear)
            out = tl.where(here, value, out)
            done = tl.where(here, 1.0, done)
            start_step = end_step
    elif SCHED_KIND == 6:  # INVERSE_SQRT
        w = _param(table_ptr, 0)
        timescale = _param(table_ptr, 1)
        after = 1.0 / tl.sqrt(tl.maximum((k + (timescale - w)) / timescale, 0.0))
        out = tl.where(k < w, k / tl.maximum(w, 1.0), after)
    elif SCHED_KIND == 8:  # WARMUP_STABLE_DECAY
        w = _param(table_ptr, 0)
        stable = _param(table_ptr, 1)
        decay = _param(table_ptr, 2)
        wtype = _param(table_ptr, 3)
        dtype_ = _param(table_ptr, 4)
        floor = _param(table_ptr, 5)
        cycles = _param(table_ptr, 6)
        warm = _ramp(k / tl.maximum(w, 1.0), wtype, cycles, True)
        dec = _ramp((k - w - stable) / tl.maximum(decay, 1.0), dtype_, cycles, False)
        warm = _clamp0(warm * (1.0 - floor) + floor)
        dec = _clamp0(dec * (1.0 - floor) + floor)
        out = tl.where(
            k < w,
            warm,
            tl.where(k < w + stable, one, tl.where(k < w + stable + decay, dec, one * floor)),
        )
    else:  # LINEAR, COSINE, COSINE_WITH_RESTARTS, POLYNOMIAL, COSINE_WARMUP_WITH_MIN_LR
        w = _param(table_ptr, 0)
        total = _param(table_ptr, 1)
        warm = k / tl.maximum(w, 1.0)
        span = tl.maximum(total - w, 1.0)
        if SCHED_KIND == 2:  # LINEAR
            after = _clamp0((total - k) / span)
        elif SCHED_KIND == 3:  # COSINE
            progress = (k - w) / span
            factor = 0.5 * (1.0 + tl.cos(3.141592653589793 * _param(table_ptr, 2) * 2.0 * progress))
            floor = _param(table_ptr, 3)
            after = _clamp0(factor * (1.0 - floor) + floor)
        elif SCHED_KIND == 4:  # COSINE_WITH_RESTARTS
            progress = (k - w) / span
            x = _param(table_ptr, 2) * progress
            factor = 0.5 * (1.0 + tl.cos(3.141592653589793 * (x - tl.floor(x))))
            after = tl.where(progress >= 1.0, 0.0, _clamp0(factor))
        elif SCHED_KIND == 5:  # POLYNOMIAL
            end_ratio = _param(table_ptr, 2)
            remaining = _clamp0(1.0 - (k - w) / span)
            after = (1.0 - end_ratio) * _pow(remaining, _param(table_ptr, 3)) + end_ratio
        else:  # COSINE_WARMUP_WITH_MIN_LR
            tl.static_assert(SCHED_KIND == 7, "unknown schedule kind")
            cycles = _param(table_ptr, 2)
            floor = _param(table_ptr, 3)
            warmup_rate = _param(table_ptr, 4)
            warm = tl.where(
                warmup_rate < 0.0,
                (k + 1.0) / tl.maximum(w, 1.0),
                warmup_rate + (1.0 - warmup_rate) * k / tl.maximum(w - 1.0, 1.0),
            )
            progress = (k - w + 1.0) / span
            factor = 0.5 * (1.0 + tl.cos(3.141592653589793 * cycles * 2.0 * progress))
            after = _clamp0(factor * (1.0 - floor) + floor)
        out = tl.where(k < w, warm, after)
    return out


def _leaf_n(kind: Kind, params: tuple[float, ...]) -> int:
    return int(params[1]) if kind in (Kind.MULTISTEP, Kind.ONECYCLE) else 0


def schedule_constexprs(schedule: Schedule | None) -> tuple[int, int]:
    """``(SCHED_KIND, SCHED_N)`` for ``schedule_multiplier`` (host side; ``NO_SCHEDULE`` for None)."""
    if schedule is None:
        return NO_SCHEDULE, 0
    kind = Kind(schedule.kind)
    if kind not in COMPOSITE_KINDS:
        return int(kind), _leaf_n(kind, schedule.params)
    p = schedule.params
    n = int(p[0])
    packed = n
    for i in range(n):
        at = 1 + n + i * CHILD_STRIDE
        child = Kind(int(p[at]))
        packed |= (int(child) | _leaf_n(child, p[at + 1 : at + CHILD_STRIDE]) << 5) << (4 + _CHILD_BITS * i)
    return int(kind), packed


@triton.jit
def _probe_kernel(table_ptr, k_ptr, out_ptr, SCHED_KIND: tl.constexpr, SCHED_N: tl.constexpr):
    i = tl.program_id(0)
    k = tl.load(k_ptr + i).to(tl.float64)
    tl.store(out_ptr + i, schedule_multiplier(table_ptr, k, SCHED_KIND, SCHED_N))


def evaluate_multiplier(schedule: Schedule, k: Tensor) -> Tensor:
    """Test helper: the in-kernel multiplier for each update index in the int64 tensor ``k``.

    Returns a float64 tensor shaped like ``k`` on ``k``'s device (one program per element).
    """
    kind, n = schedule_constexprs(schedule)
    ks = k.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(ks.shape, dtype=torch.float64, device=k.device)
    if ks.numel():
        _probe_kernel[(ks.numel(),)](schedule.as_tensor(k.device), ks, out, SCHED_KIND=kind, SCHED_N=n)
    return out.reshape(k.shape)
