"""Learning-rate schedules evaluated in closed form from the update index.

Convention (the same as ``torch.optim.lr_scheduler.LambdaLR`` stepped once per
optimizer step, and Hugging Face's ``get_scheduler``): ``sched(k)`` is the
multiplier applied to a group's peak ``lr`` for the update that has ``k``
updates before it. The first update uses ``k = 0``.

Every schedule is a ``Schedule``: a kind (a small integer) and a tuple of
float parameters. The formulas below, written once with torch ops on a float64
tensor of steps, are the specification; the Triton kernels
(``fusedlr/triton/schedule.py``) and the CUDA/C++ kernels (``csrc/schedule.h``)
evaluate the same encoding and are tested against it. No formula recurses, so
nothing drifts with the step count.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, Sequence, overload

import torch
from torch import Tensor

__all__ = ["Kind", "Schedule", "get_schedule", "sequential", "product", "SCHEDULE_NAMES"]

MAX_MILESTONES = 16
#: A composite schedule (SEQUENTIAL, PRODUCT) holds at most this many children ...
MAX_CHILDREN = 5
#: ... each padded to this many table entries (its kind, then its parameters).
CHILD_STRIDE = 20


class Kind(enum.IntEnum):
    """Schedule kinds, as read by the kernels. Parameter layout in ``Schedule.params``."""

    CONSTANT = 0  # ()
    CONSTANT_WITH_WARMUP = 1  # (warmup,)
    LINEAR = 2  # (warmup, total)
    COSINE = 3  # (warmup, total, num_cycles, min_lr_rate)
    COSINE_WITH_RESTARTS = 4  # (warmup, total, num_cycles)
    POLYNOMIAL = 5  # (warmup, total, end_ratio, power)
    INVERSE_SQRT = 6  # (warmup, timescale)
    COSINE_WARMUP_WITH_MIN_LR = 7  # (warmup, total, num_cycles, min_lr_rate, warmup_lr_rate or -1)
    WARMUP_STABLE_DECAY = 8  # (warmup, stable, decay, warmup_type, decay_type, min_lr_ratio, num_cycles)
    STEP = 9  # (step_size, gamma)
    MULTISTEP = 10  # (gamma, n, m_1 ... m_n)
    EXPONENTIAL = 11  # (gamma,)
    ONECYCLE = 12  # (anneal (0 cos, 1 linear), n_phases, (end_step, start, end) * n_phases)
    COSINE_ANNEALING = 13  # (T_max, eta_min_ratio): torch CosineAnnealingLR
    COSINE_WARM_RESTARTS = 14  # (T_0, T_mult, eta_min_ratio): torch CosineAnnealingWarmRestarts
    LINEAR_FACTOR = 15  # (start_factor, end_factor, total_iters): torch LinearLR
    CONSTANT_FACTOR = 16  # (factor, total_iters): torch ConstantLR
    POLYNOMIAL_DECAY = 17  # (total_iters, power): torch PolynomialLR
    CYCLIC = 18  # (base_ratio, max_ratio, step_size_up, total_size, mode (0 triangular, 1 triangular2, 2 exp_range), gamma)
    FACTOR = 19  # (value,): a constant the device may overwrite in the table (fusedlr.DevicePlateau)
    SEQUENTIAL = 20  # (n, start_0 .. start_{n-1}, n child tables of CHILD_STRIDE entries): torch SequentialLR
    PRODUCT = 21  # (n, 0 .. 0, n child tables of CHILD_STRIDE entries): torch ChainedScheduler


COMPOSITE_KINDS = (Kind.SEQUENTIAL, Kind.PRODUCT)


# Shape codes of the warmup-stable-decay ramps.
_RAMPS = {"linear": 0, "cosine": 1, "1-sqrt": 2}


def _warmup(k: Tensor, w: float) -> Tensor:
    return k / max(1.0, w)


def _ramp(progress: Tensor, shape: int, num_cycles: float, rising: bool) -> Tensor:
    """The WSD ramp shapes: factor at ``progress`` in [0, 1] through a phase."""
    if shape == 0:
        return progress if rising else 1.0 - progress
    if shape == 1:
        if rising:
            return 0.5 * (1.0 - torch.cos(math.pi * progress))
        return 0.5 * (1.0 + torch.cos(math.pi * num_cycles * 2.0 * progress))
    return 1.0 - torch.sqrt((1.0 - progress) if rising else progress)


def _anneal(start: float, end: float, pct: Tensor, linear: bool) -> Tensor:
    if linear:
        return (end - start) * pct + start
    return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1.0)


def _children(p: Sequence[float]) -> list[tuple[float, Kind, Sequence[float], int]]:
    """A composite's children: ``(start, kind, params, index of params[0] in p)``."""
    n = int(p[0])
    out = []
    for i in range(n):
        at = 1 + n + i * CHILD_STRIDE
        out.append((p[1 + i], Kind(int(p[at])), p[at + 1 : at + CHILD_STRIDE], at + 1))
    return out


def _restarts(k: Tensor, t0: float, t_mult: float) -> tuple[Tensor, Tensor]:
    """CosineAnnealingWarmRestarts' ``(T_cur, T_i)`` at update ``k``, exact for integer k < 2^53.

    The cycle number from a logarithm, corrected by one either way where rounding put it off.
    """
    if t_mult == 1.0:
        return torch.remainder(k, t0), torch.full_like(k, t0)
    def first(n: Tensor) -> Tensor:  # the first update of cycle n; integers, rounded where pow is inexact
        return torch.round(t0 * (torch.pow(t_mult, n) - 1.0) / (t_mult - 1.0))

    n = torch.floor(torch.log(k / t0 * (t_mult - 1.0) + 1.0) / math.log(t_mult))
    n = torch.where(first(n) > k, n - 1.0, n)
    n = torch.where(first(n + 1.0) <= k, n + 1.0, n)
    return k - first(n), first(n + 1.0) - first(n)


def _cyclic(p: Sequence[float], k: Tensor) -> Tensor:
    base, peak, up, total, mode, gamma = p[:6]
    ratio = up / total
    cycle = torch.floor(1.0 + k / total)
    x = 1.0 + k / total - cycle
    factor = torch.where(x <= ratio, x / ratio, (x - 1.0) / (ratio - 1.0))
    if mode == 0:
        scale = torch.ones_like(k)
    elif mode == 1:
        scale = torch.pow(0.5, cycle - 1.0)
    else:
        scale = torch.pow(gamma, k)
    return base + (peak - base) * factor * scale


def evaluate(kind: Kind, p: Sequence[float], k: Tensor, table: Tensor | None = None, at: int = 1) -> Tensor:
    """The multiplier for update index ``k`` (a float64 tensor of non-negative integers).

    ``table``: the device table ``[kind, *params]`` (``p[0]`` at ``table[at]``); a FACTOR's value is
    read from it (the device may have overwritten it), else from ``p``.
    """
    one = torch.ones_like(k)
    if kind == Kind.CONSTANT:
        return one
    if kind == Kind.FACTOR:
        return one * (p[0] if table is None else table[at])
    if kind in COMPOSITE_KINDS:
        children = _children(p)
        out = one if kind == Kind.PRODUCT else torch.zeros_like(k)
        for start, child, q, offset in children:
            value = evaluate(child, q, torch.clamp(k - start, min=0.0), table, at + offset)
            out = out * value if kind == Kind.PRODUCT else torch.where(k >= start, value, out)
        return out
    if kind == Kind.COSINE_ANNEALING:
        t_max, eta = p[0], p[1]
        return eta + (1.0 - eta) * (1.0 + torch.cos(math.pi * k / t_max)) / 2.0
    if kind == Kind.COSINE_WARM_RESTARTS:
        t_cur, t_i = _restarts(k, p[0], p[1])
        return p[2] + (1.0 - p[2]) * (1.0 + torch.cos(math.pi * t_cur / t_i)) / 2.0
    if kind == Kind.LINEAR_FACTOR:
        start, end, total_iters = p[0], p[1], p[2]
        return start + (end - start) * torch.clamp(k, max=total_iters) / total_iters
    if kind == Kind.CONSTANT_FACTOR:
        return p[0] + (k >= p[1]).to(k.dtype) * (1.0 - p[0])
    if kind == Kind.POLYNOMIAL_DECAY:
        return torch.pow(1.0 - torch.clamp(k, max=p[0]) / p[0], p[1])
    if kind == Kind.CYCLIC:
        return _cyclic(p, k)
    if kind == Kind.CONSTANT_WITH_WARMUP:
        return torch.where(k < p[0], _warmup(k, p[0]), one)
    if kind == Kind.EXPONENTIAL:
        return torch.pow(p[0], k)
    if kind == Kind.STEP:
        return torch.pow(p[1], torch.floor(k / p[0]))
    if kind == Kind.MULTISTEP:
        n = int(p[1])
        passed = sum(((k >= m).to(k.dtype) for m in p[2 : 2 + n]), torch.zeros_like(k))
        return torch.pow(p[0], passed)
    if kind == Kind.ONECYCLE:
        linear, n = bool(p[0]), int(p[1])
        k = torch.clamp(k, max=p[2 + 3 * (n - 1)])  # past the last phase: hold the final value
        out = torch.zeros_like(k)
        start_step = 0.0
        done = torch.zeros_like(k, dtype=torch.bool)
        for i in range(n):
            end_step, lo, hi = p[2 + 3 * i : 5 + 3 * i]
            here = ~done & ((k <= end_step) if i < n - 1 else torch.ones_like(done))
            value = _anneal(lo, hi, (k - start_step) / (end_step - start_step), linear)
            out = torch.where(here, value, out)
            done = done | here
            start_step = end_step
        return out
    if kind == Kind.INVERSE_SQRT:
        w, timescale = p[0], p[1]
        return torch.where(k < w, _warmup(k, w), 1.0 / torch.sqrt((k + (timescale - w)) / timescale))
    if kind == Kind.WARMUP_STABLE_DECAY:
        w, stable, decay, wtype, dtype_, floor, cycles = p[:7]
        warm = _ramp(k / max(1.0, w), int(wtype), cycles, rising=True)
        dec = _ramp((k - w - stable) / max(1.0, decay), int(dtype_), cycles, rising=False)
        warm = torch.clamp(warm * (1.0 - floor) + floor, min=0.0)
        dec = torch.clamp(dec * (1.0 - floor) + floor, min=0.0)
        return torch.where(
            k < w,
            warm,
            torch.where(k < w + stable, one, torch.where(k < w + stable + decay, dec, one * floor)),
        )
    w, total = p[0], p[1]
    warm = _warmup(k, w)
    if kind == Kind.LINEAR:
        after = torch.clamp((total - k) / max(1.0, total - w), min=0.0)
    elif kind == Kind.COSINE:
        progress = (k - w) / max(1.0, total - w)
        factor = 0.5 * (1.0 + torch.cos(math.pi * p[2] * 2.0 * progress))
        after = torch.clamp(factor * (1.0 - p[3]) + p[3], min=0.0)
    elif kind == Kind.COSINE_WITH_RESTARTS:
        progress = (k - w) / max(1.0, total - w)
        factor = 0.5 * (1.0 + torch.cos(math.pi * torch.remainder(p[2] * progress, 1.0)))
        after = torch.where(progress >= 1.0, torch.zeros_like(k), torch.clamp(factor, min=0.0))
    elif kind == Kind.POLYNOMIAL:
        end_ratio, power = p[2], p[3]
        remaining = torch.clamp(1.0 - (k - w) / max(1.0, total - w), min=0.0)
        after = (1.0 - end_ratio) * torch.pow(remaining, power) + end_ratio
    elif kind == Kind.COSINE_WARMUP_WITH_MIN_LR:
        cycles, floor, warmup_rate = p[2], p[3], p[4]
        if warmup_rate < 0:
            warm = (k + 1.0) / max(1.0, w)
        else:
            warm = warmup_rate + (1.0 - warmup_rate) * k / max(1.0, w - 1.0)
        progress = (k - w + 1.0) / max(1.0, total - w)
        factor = 0.5 * (1.0 + torch.cos(math.pi * cycles * 2.0 * progress))
        after = torch.clamp(factor * (1.0 - floor) + floor, min=0.0)
    else:
        raise ValueError(f"unknown schedule kind {kind!r}")
    return torch.where(k < w, warm, after)


@dataclass(frozen=True)
class Schedule:
    """An LR multiplier ``k -> float`` in closed form; see the module docstring for ``k``.

    ``params`` is the encoding the kernels read (see ``Kind`` for the layout). ``absolute`` lists
    ``(index, lr)`` pairs of parameters given as absolute LRs (polynomial's ``lr_end``, ``min_lr``):
    they are divided by the peak LR when the schedule is given to an optimizer (``bind``).
    """

    name: str
    kind: Kind
    params: tuple[float, ...]
    absolute: tuple[tuple[int, float], ...] = ()

    def bind(self, peak_lr: float) -> "Schedule":
        """This schedule with its absolute-LR parameters made relative to ``peak_lr``.

        ``fusedlr.AdamW(schedule=...)`` calls it with the optimizer's ``lr`` (Hugging Face's
        ``get_scheduler`` takes ``optimizer.defaults['lr']`` the same way).
        """
        if not self.absolute:
            return self
        peak = _real("lr (the peak LR the schedule's absolute LRs are relative to)", peak_lr, 0.0)
        params = list(self.params)
        for index, lr in self.absolute:
            if self.kind == Kind.POLYNOMIAL and not peak > lr:
                raise ValueError(f"polynomial: lr_end ({lr}) must be smaller than the optimizer's lr ({peak_lr})")
            if peak == 0.0:
                raise ValueError(f"{self.name}: an absolute min/end LR needs a positive optimizer lr, got {peak_lr}")
            params[index] = lr / peak
        return Schedule(self.name, self.kind, tuple(params))

    def _check_bound(self) -> None:
        if self.absolute:
            raise ValueError(
                f"schedule {self.name!r} holds absolute LRs: give it to fusedlr.AdamW(schedule=...), which takes the "
                "peak LR from the optimizer's lr, or call .bind(peak_lr) first"
            )

    @overload
    def __call__(self, k: int) -> float: ...
    @overload
    def __call__(self, k: Tensor, table: Tensor | None = None) -> Tensor: ...

    def __call__(self, k: int | Tensor, table: Tensor | None = None) -> float | Tensor:
        """The multiplier for update index ``k`` (int), or for each element of an integer tensor.

        A tensor result is float64 on the tensor's device; evaluating a tensor never syncs.
        ``table``: the device table (``as_tensor()``) whose FACTOR entries the device may have changed
        (``fusedlr.DevicePlateau``); None evaluates ``params``.
        """
        self._check_bound()
        if isinstance(k, Tensor):
            if k.is_floating_point() or k.is_complex():
                raise ValueError(f"schedule steps must be an integer tensor, got {k.dtype}")
            return evaluate(self.kind, self.params, k.to(torch.float64), table)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"schedule step k must be a non-negative int (k=0 is the first update), got {k!r}")
        return float(evaluate(self.kind, self.params, torch.tensor(float(k), dtype=torch.float64)))

    def as_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """The encoding ``[kind, *params]`` as a float64 tensor, the form the kernels read."""
        self._check_bound()
        return torch.tensor([float(self.kind), *self.params], dtype=torch.float64, device=device)


def _composite(kind: Kind, name: str, children: Sequence[Schedule], starts: Sequence[float]) -> Schedule:
    if not 1 <= len(children) <= MAX_CHILDREN:
        raise ValueError(f"{name}: combine 1 to {MAX_CHILDREN} schedules, got {len(children)}")
    body: list[float] = []
    for child in children:
        if not isinstance(child, Schedule):
            raise ValueError(f"{name}: children must be fusedlr.Schedule objects, got {child!r}")
        if child.kind in COMPOSITE_KINDS:
            raise ValueError(f"{name}: a combined schedule cannot hold another combined schedule ({child.name})")
        child._check_bound()
        if len(child.params) >= CHILD_STRIDE:
            raise ValueError(f"{name}: {child.name} has too many parameters to combine ({len(child.params)})")
        body += [float(child.kind), *child.params, *[0.0] * (CHILD_STRIDE - 1 - len(child.params))]
    return Schedule(name, kind, (float(len(children)), *(float(s) for s in starts), *body))


def sequential(children: Sequence[Schedule], milestones: Sequence[int]) -> Schedule:
    """torch ``SequentialLR``: ``children[i]`` from update ``milestones[i-1]`` on, restarted at its k=0 there."""
    ms = [_nonneg_int("milestones[i]", m) for m in milestones]
    if len(ms) != len(children) - 1 or ms != sorted(ms):
        raise ValueError(f"sequential: pass len(children) - 1 increasing milestones, got {list(milestones)}")
    return _composite(Kind.SEQUENTIAL, "sequential", children, [0, *ms])


def product(children: Sequence[Schedule]) -> Schedule:
    """torch ``ChainedScheduler`` of multiplicative schedulers: the product of the multipliers."""
    return _composite(Kind.PRODUCT, "product", children, [0] * len(children))


def _count(name: str, value: object, least: int) -> int:
    """An int >= least; an integral float (``1e5``) is accepted, as Hugging Face computes counts in floats."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        kind = "a positive" if least > 0 else "a non-negative"
        raise ValueError(f"{name} must be {kind} int, got {value!r}")
    return value


def _nonneg_int(name: str, value: object) -> int:
    return _count(name, value, 0)


def _pos_int(name: str, value: object) -> int:
    return _count(name, value, 1)


def _real(name: str, value: object, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def _warmup_total(w: object, total: object) -> tuple[float, float]:
    w_, t_ = _nonneg_int("num_warmup_steps", w), _pos_int("num_training_steps", total)
    if w_ > t_:
        raise ValueError(f"num_warmup_steps ({w_}) must not exceed num_training_steps ({t_})")
    return float(w_), float(t_)


def _min_rate(
    min_lr: float | None, min_lr_rate: float | None, lr_init: float | None, index: int
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """``(min_lr_rate, absolute)``: ``min_lr`` without ``lr_init`` is resolved from the optimizer's lr."""
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError("pass only one of min_lr or min_lr_rate")
    if min_lr is not None:
        if lr_init is None:
            return 0.0, ((index, _real("min_lr", min_lr, 0.0)),)
        return _real("min_lr", min_lr, 0.0) / _real("lr_init", lr_init, 0.0), ()
    if min_lr_rate is None:
        raise ValueError("pass min_lr_rate (a fraction of the peak lr) or min_lr (an absolute LR)")
    return _real("min_lr_rate", min_lr_rate, 0.0, 1.0), ()


def _constant(w: int | None, total: int | None) -> Schedule:
    return Schedule("constant", Kind.CONSTANT, ())


def _constant_with_warmup(w: int | None, total: int | None) -> Schedule:
    return Schedule("constant_with_warmup", Kind.CONSTANT_WITH_WARMUP, (float(_nonneg_int("num_warmup_steps", w)),))


def _linear(w: int | None, total: int | None) -> Schedule:
    return Schedule("linear", Kind.LINEAR, _warmup_total(w, total))


def _cosine(w: int | None, total: int | None, num_cycles: float = 0.5) -> Schedule:
    return Schedule("cosine", Kind.COSINE, (*_warmup_total(w, total), _real("num_cycles", num_cycles, 0.0), 0.0))


def _cosine_with_restarts(w: int | None, total: int | None, num_cycles: float = 1) -> Schedule:
    params = (*_warmup_total(w, total), _real("num_cycles", num_cycles, 0.0))
    return Schedule("cosine_with_restarts", Kind.COSINE_WITH_RESTARTS, params)


def _polynomial(
    w: int | None, total: int | None, lr_end: float = 1e-7, power: float = 1.0, lr_init: float | None = None
) -> Schedule:
    end = _real("lr_end", lr_end, 0.0)
    params = (*_warmup_total(w, total), 0.0, _real("power", power, 0.0))
    schedule = Schedule("polynomial", Kind.POLYNOMIAL, params, absolute=((2, end),))
    return schedule if lr_init is None else schedule.bind(lr_init)


def _inverse_sqrt(w: int | None, total: int | None, timescale: int | None = None) -> Schedule:
    w_ = _nonneg_int("num_warmup_steps", w)
    ts = _pos_int("timescale", timescale) if timescale is not None else (w_ or 10_000)
    return Schedule("inverse_sqrt", Kind.INVERSE_SQRT, (float(w_), float(ts)))


def _cosine_with_min_lr(
    w: int | None,
    total: int | None,
    num_cycles: float = 0.5,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
    lr_init: float | None = None,
) -> Schedule:
    rate, absolute = _min_rate(min_lr, min_lr_rate, lr_init, 3)
    params = (*_warmup_total(w, total), _real("num_cycles", num_cycles, 0.0), rate)
    return Schedule("cosine_with_min_lr", Kind.COSINE, params, absolute)


def _cosine_warmup_with_min_lr(
    w: int | None,
    total: int | None,
    num_cycles: float = 0.5,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
    warmup_lr_rate: float | None = None,
    lr_init: float | None = None,
) -> Schedule:
    rate, absolute = _min_rate(min_lr, min_lr_rate, lr_init, 3)
    wr = -1.0 if warmup_lr_rate is None else _real("warmup_lr_rate", warmup_lr_rate, 0.0, 1.0)
    params = (*_warmup_total(w, total), _real("num_cycles", num_cycles, 0.0), rate, wr)
    return Schedule("cosine_warmup_with_min_lr", Kind.COSINE_WARMUP_WITH_MIN_LR, params, absolute)


def _warmup_stable_decay(
    w: int | None,
    total: int | None,
    num_decay_steps: int | None = None,
    num_stable_steps: int | None = None,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr_ratio: float = 0.0,
    num_cycles: float = 0.5,
) -> Schedule:
    w_ = _nonneg_int("num_warmup_steps", w)
    decay = _nonneg_int("num_decay_steps", num_decay_steps)
    if num_stable_steps is None:
        if total is None:
            raise ValueError("warmup_stable_decay: pass num_training_steps or num_stable_steps")
        num_stable_steps = _pos_int("num_training_steps", total) - w_ - decay
        if num_stable_steps < 0:
            raise ValueError(
                f"num_warmup_steps + num_decay_steps ({w_ + decay}) must not exceed num_training_steps ({total})"
            )
    stable = _nonneg_int("num_stable_steps", num_stable_steps)
    for arg, value in (("warmup_type", warmup_type), ("decay_type", decay_type)):
        if value not in _RAMPS:
            raise ValueError(f"{arg} must be one of {sorted(_RAMPS)}, got {value!r}")
    params = (
        float(w_),
        float(stable),
        float(decay),
        float(_RAMPS[warmup_type]),
        float(_RAMPS[decay_type]),
        _real("min_lr_ratio", min_lr_ratio, 0.0, 1.0),
        _real("num_cycles", num_cycles, 0.0),
    )
    return Schedule("warmup_stable_decay", Kind.WARMUP_STABLE_DECAY, params)


def _step(w: int | None, total: int | None, step_size: int | None = None, gamma: float = 0.1) -> Schedule:
    params = (float(_pos_int("step_size", step_size)), _real("gamma", gamma, 0.0))
    return Schedule("step", Kind.STEP, params)


def _multistep(w: int | None, total: int | None, milestones: Sequence[int] = (), gamma: float = 0.1) -> Schedule:
    ms = [_nonneg_int("milestones[i]", m) for m in milestones]
    if not ms or len(ms) > MAX_MILESTONES:
        raise ValueError(f"milestones must hold 1 to {MAX_MILESTONES} step indices, got {len(ms)}")
    params = (_real("gamma", gamma, 0.0), float(len(ms)), *(float(m) for m in sorted(ms)))
    return Schedule("multistep", Kind.MULTISTEP, params)


def _exponential(w: int | None, total: int | None, gamma: float | None = None) -> Schedule:
    if gamma is None:
        raise ValueError("exponential: pass gamma (the per-update decay factor)")
    return Schedule("exponential", Kind.EXPONENTIAL, (_real("gamma", gamma, 0.0),))


def _onecycle(
    w: int | None,
    total: int | None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    t = float(_pos_int("num_training_steps", total))
    pct = _real("pct_start", pct_start, 0.0, 1.0)
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    initial = 1.0 / _real("div_factor", div_factor, 1e-12)
    final = initial / _real("final_div_factor", final_div_factor, 1e-12)
    if three_phase:
        phases = [(pct * t - 1, initial, 1.0), (2 * pct * t - 2, 1.0, initial), (t - 1, initial, final)]
    else:
        phases = [(pct * t - 1, initial, 1.0), (t - 1, 1.0, final)]
    flat = [x for phase in phases for x in phase]
    return Schedule("onecycle", Kind.ONECYCLE, (float(anneal_strategy == "linear"), float(len(phases)), *flat))


_FACTORIES: dict[str, Callable[..., Schedule]] = {
    "constant": _constant,
    "constant_with_warmup": _constant_with_warmup,
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
    "inverse_sqrt": _inverse_sqrt,
    "cosine_with_min_lr": _cosine_with_min_lr,
    "cosine_warmup_with_min_lr": _cosine_warmup_with_min_lr,
    "warmup_stable_decay": _warmup_stable_decay,
    "step": _step,
    "multistep": _multistep,
    "exponential": _exponential,
    "onecycle": _onecycle,
}
SCHEDULE_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def get_schedule(
    name: str,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    scheduler_specific_kwargs: dict[str, object] | None = None,
    **kwargs: object,
) -> Schedule:
    """Build a schedule by name, with Hugging Face ``get_scheduler``'s names and keyword arguments.

    Names: constant, constant_with_warmup, linear, cosine (num_cycles), cosine_with_restarts
    (num_cycles), polynomial (lr_end, power, lr_init), inverse_sqrt (timescale), cosine_with_min_lr
    (num_cycles, min_lr_rate | min_lr), cosine_warmup_with_min_lr (also warmup_lr_rate),
    warmup_stable_decay (num_decay_steps, num_stable_steps, warmup_type, decay_type, min_lr_ratio,
    num_cycles), and torch's closed forms step (step_size, gamma), multistep (milestones, gamma),
    exponential (gamma), onecycle (pct_start, anneal_strategy, div_factor, final_div_factor,
    three_phase; ``num_training_steps`` is OneCycleLR's ``total_steps``, the multiplier is relative
    to ``max_lr`` and holds its last value after the last step).

    ``scheduler_specific_kwargs`` (Hugging Face's way of passing them) are merged into ``kwargs``.
    Step counts may be integral floats. Absolute LRs (``lr_end``, ``min_lr``) are made relative to the
    peak LR of the optimizer the schedule is given to (its ``lr``), or to ``lr_init`` when passed.
    Raises ValueError naming the argument for an unknown name or invalid values.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown schedule name {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    kwargs = {**(scheduler_specific_kwargs or {}), **kwargs}
    try:
        return _FACTORIES[name](num_warmup_steps if num_warmup_steps is not None else 0, num_training_steps, **kwargs)
    except TypeError as err:
        raise ValueError(f"schedule {name!r}: {err}") from err
