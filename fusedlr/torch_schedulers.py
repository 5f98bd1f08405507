"""torch LR schedulers as fusedlr device schedules, and ``ReduceLROnPlateau`` on the device.

``from_torch_scheduler(scheduler)`` reads a constructed torch scheduler and returns the closed-form
``Schedule`` whose multiplier for update ``k`` (k=0 the first) is the LR torch's scheduler sets for
that update divided by the group's ``initial_lr`` (the scheduler's ``base_lrs``). Give it to a
``fusedlr.AdamW`` whose groups' ``lr`` are those ``initial_lr`` values (``load_state_dict`` of the
torch optimizer's state dict restores them). Absolute LRs (``eta_min``, CyclicLR's ``base_lr`` and
``max_lr``) become ratios to those ``initial_lr``; one schedule drives every group, so the ratios
must agree across groups.

``DevicePlateau`` is ``ReduceLROnPlateau`` fed a device metric tensor: its decision and the LR
multiplier stay on the device (no sync), in a FACTOR entry of the optimizer's schedule table.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import lr_scheduler as tl

from .schedules import CHILD_STRIDE, COMPOSITE_KINDS, Kind, Schedule, get_schedule, product, sequential

__all__ = ["from_torch_scheduler", "DevicePlateau"]

_REL = 1e-12  # tolerance for "the same ratio in every group"


def _ratio(name: str, values: list[float], base: list[float]) -> float:
    """``values[g] / base[g]``, the same for every group (else one schedule cannot drive them all)."""
    ratios = [float(v) / float(b) for v, b in zip(values, base)]
    if any(abs(r - ratios[0]) > _REL * max(1.0, abs(ratios[0])) for r in ratios):
        raise ValueError(
            f"{name} relative to each group's initial_lr differs between param groups ({ratios}); fusedlr applies "
            "one schedule to every group: use one optimizer per ratio, or equal ratios"
        )
    return ratios[0]


def _no_momentum_cycling(s: Any) -> None:
    if getattr(s, "cycle_momentum", False):
        raise ValueError(
            f"{type(s).__name__} cycles the momentum (Adam's beta1) too and fusedlr schedules only the LR: "
            "construct it with cycle_momentum=False"
        )


def _onecycle(s: tl.OneCycleLR, base: list[float]) -> Schedule:
    _no_momentum_cycling(s)
    groups = s.optimizer.param_groups
    phases: list[float] = []
    for phase in s._schedule_phases:
        start = _ratio("OneCycleLR's " + phase["start_lr"], [g[phase["start_lr"]] for g in groups], base)
        end = _ratio("OneCycleLR's " + phase["end_lr"], [g[phase["end_lr"]] for g in groups], base)
        phases += [float(phase["end_step"]), start, end]
    linear = float(s._anneal_func_type == "linear")
    return Schedule("OneCycleLR", Kind.ONECYCLE, (linear, float(len(s._schedule_phases)), *phases))


def _cyclic(s: tl.CyclicLR, base: list[float]) -> Schedule:
    _no_momentum_cycling(s)
    if s._scale_fn_custom is not None:
        raise ValueError("CyclicLR with a custom scale_fn is a Python function: use mode='triangular', "
                         "'triangular2' or 'exp_range'")
    mode = {"triangular": 0.0, "triangular2": 1.0, "exp_range": 2.0}[s.mode]
    peak = _ratio("CyclicLR's max_lr", s.max_lrs, base)
    lo = _ratio("CyclicLR's base_lr", s.base_lrs, base)
    up = s.step_ratio * s.total_size
    return Schedule("CyclicLR", Kind.CYCLIC, (lo, peak, float(up), float(s.total_size), mode, float(s.gamma)))


def _leaf(s: Any, base: list[float]) -> Schedule:
    """One non-composite scheduler (its ``base_lrs`` must be ``base``)."""
    if not isinstance(s, _SUPPORTED):
        raise ValueError(_refusal(s))
    name = type(s).__name__
    if abs(_ratio(f"{name}'s base_lrs", s.base_lrs, base) - 1.0) > _REL:  # a later OneCycleLR reset initial_lr
        raise ValueError(f"{name}'s base_lrs are not the groups' initial_lr (another scheduler changed it)")
    if isinstance(s, tl.StepLR):
        return get_schedule("step", step_size=s.step_size, gamma=s.gamma)
    if isinstance(s, tl.MultiStepLR):
        return get_schedule("multistep", milestones=sorted(s.milestones.elements()), gamma=s.gamma)
    if isinstance(s, tl.ExponentialLR):
        return get_schedule("exponential", gamma=s.gamma)
    if isinstance(s, tl.CosineAnnealingLR):
        eta = _ratio("CosineAnnealingLR's eta_min", [s.eta_min] * len(base), base)
        return Schedule(name, Kind.COSINE_ANNEALING, (float(s.T_max), eta))
    if isinstance(s, tl.CosineAnnealingWarmRestarts):
        eta = _ratio("CosineAnnealingWarmRestarts' eta_min", [s.eta_min] * len(base), base)
        return Schedule(name, Kind.COSINE_WARM_RESTARTS, (float(s.T_0), float(s.T_mult), eta))
    if isinstance(s, tl.LinearLR):
        return Schedule(name, Kind.LINEAR_FACTOR, (float(s.start_factor), float(s.end_factor), float(s.total_iters)))
    if isinstance(s, tl.ConstantLR):
        return Schedule(name, Kind.CONSTANT_FACTOR, (float(s.factor), float(s.total_iters)))
    if isinstance(s, tl.PolynomialLR):
        return Schedule(name, Kind.POLYNOMIAL_DECAY, (float(s.total_iters), float(s.power)))
    if isinstance(s, tl.OneCycleLR):
        return _onecycle(s, base)
    return _cyclic(s, base)


def _refusal(s: Any) -> str:
    name = type(s).__name__
    if isinstance(s, tl.ReduceLROnPlateau):
        return "ReduceLROnPlateau decides from a metric, not from k: use fusedlr.DevicePlateau(opt, ...) instead"
    if isinstance(s, (tl.LambdaLR, tl.MultiplicativeLR)):
        return (f"{name} runs a Python function, which cannot be evaluated on the device: use fusedlr.get_schedule "
                "(Hugging Face's names) or one of torch's closed-form schedulers, or keep schedule=None and let "
                f"the {name} set param_groups[i]['lr']")
    return (f"{name} is not supported; supported: StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR, "
            "CosineAnnealingWarmRestarts, LinearLR, ConstantLR, PolynomialLR, OneCycleLR, CyclicLR and "
            "SequentialLR/ChainedScheduler of them")


_SUPPORTED = (
    tl.StepLR, tl.MultiStepLR, tl.ExponentialLR, tl.CosineAnnealingLR, tl.CosineAnnealingWarmRestarts, tl.LinearLR,
    tl.ConstantLR, tl.PolynomialLR, tl.OneCycleLR, tl.CyclicLR,
)
# ChainedScheduler multiplies the current LR by each scheduler's factor only for these.
_MULTIPLICATIVE = (tl.StepLR, tl.MultiStepLR, tl.ExponentialLR, tl.LinearLR, tl.ConstantLR, tl.PolynomialLR)


def from_torch_scheduler(scheduler: tl.LRScheduler) -> Schedule:
    """The device ``Schedule`` equal, update for update, to what ``scheduler`` sets.

    The multiplier is relative to each group's ``initial_lr`` (``scheduler.base_lrs``); ``k`` counts
    updates from the scheduler's construction (k=0: the LR before its first ``step()``).
    Raises ValueError naming the scheduler and the fix for what has no closed form here.
    """
    groups = scheduler.optimizer.param_groups
    base = [float(g.get("initial_lr", g["lr"])) for g in groups]
    if any(b <= 0.0 for b in base):
        raise ValueError(f"from_torch_scheduler needs positive initial LRs, got {base}")
    if isinstance(scheduler, tl.SequentialLR):
        children = [_leaf(s, base) for s in _flat(scheduler)]
        return sequential(children, list(scheduler._milestones))
    if isinstance(scheduler, tl.ChainedScheduler):
        parts = _flat(scheduler)
        for s in parts:
            if not isinstance(s, _MULTIPLICATIVE):
                raise ValueError(
                    f"ChainedScheduler multiplies factors; {type(s).__name__} sets the LR itself, so the chain's "
                    "LR depends on the order of steps: chain only StepLR, MultiStepLR, ExponentialLR, LinearLR, "
                    "ConstantLR and PolynomialLR, or use SequentialLR"
                )
        return product([_leaf(s, base) for s in parts])
    return _leaf(scheduler, base)


def _flat(composite: Any) -> list[Any]:
    children = list(composite._schedulers)
    for s in children:
        if isinstance(s, (tl.SequentialLR, tl.ChainedScheduler)):
            raise ValueError(f"{type(composite).__name__} of a {type(s).__name__} is not supported: flatten it")
    return children


_MODES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "min-rel": lambda a, best, t: a < best * (1.0 - t),
    "min-abs": lambda a, best, t: a < best - t,
    "max-rel": lambda a, best, t: a > best * (t + 1.0),
    "max-abs": lambda a, best, t: a > best + t,
}


class DevicePlateau:
    """``torch.optim.lr_scheduler.ReduceLROnPlateau`` on the device: ``step(metric)`` takes a 0-d
    device tensor and never syncs (CUDA-graph capturable).

    The LR multiplier lives in a FACTOR entry of ``opt``'s schedule table, composed with its
    ``schedule`` (the applied LR is ``lr * schedule(k) * multiplier``). Arguments as torch's;
    ``min_lr`` is an absolute LR, turned into a ratio to the groups' ``lr`` (equal in every group).
    Build it before the first step (it extends ``opt.schedule``); ``multiplier`` is the current factor.
    """

    def __init__(
        self,
        opt: Any,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        if f"{mode}-{threshold_mode}" not in _MODES:
            raise ValueError(f"mode must be 'min' or 'max' and threshold_mode 'rel' or 'abs', got {mode!r}, "
                             f"{threshold_mode!r}")
        if not 0.0 <= factor < 1.0:
            raise ValueError(f"factor must be in [0, 1), got {factor!r}")
        lrs = [float(g["lr"]) for g in opt.param_groups]
        self.min_ratio = _ratio("min_lr", [min_lr] * len(lrs), lrs) if lrs[0] > 0 else 0.0
        self.opt, self.factor, self.patience, self.cooldown = opt, float(factor), int(patience), int(cooldown)
        self.threshold, self.eps, self._better = float(threshold), float(eps), _MODES[f"{mode}-{threshold_mode}"]
        self._peak = lrs[0]
        inner = opt.schedule if opt.schedule is not None else get_schedule("constant")
        if inner.kind in COMPOSITE_KINDS:
            raise ValueError("DevicePlateau cannot extend a SequentialLR/ChainedScheduler schedule (no nesting)")
        opt.schedule = product([inner, Schedule("plateau", Kind.FACTOR, (1.0,))])
        opt._schedule_table = None
        self._slot = 1 + 1 + 2 + CHILD_STRIDE + 1  # the FACTOR child's value in [PRODUCT, n, s0, s1, c0, c1]
        device = opt._device() or torch.device("cpu")
        self.best = torch.full((), math.inf if mode == "min" else -math.inf, dtype=torch.float64, device=device)
        self.num_bad = torch.zeros((), dtype=torch.int64, device=device)
        self.cooldown_counter = torch.zeros((), dtype=torch.int64, device=device)
        self.multiplier = torch.ones((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def step(self, metric: Tensor | float) -> None:
        """One ``ReduceLROnPlateau.step(metric)`` decision, entirely on the device."""
        current = torch.as_tensor(metric, dtype=torch.float64, device=self.best.device)
        better = self._better(current, self.best, self.threshold)
        self.best.copy_(torch.where(better, current, self.best))
        bad = torch.where(better, torch.zeros_like(self.num_bad), self.num_bad + 1)
        cooling = self.cooldown_counter > 0
        self.cooldown_counter.sub_(cooling.to(torch.int64))
        bad = torch.where(cooling, torch.zeros_like(bad), bad)
        reduce = bad > self.patience
        old = self.multiplier * self._peak
        new = torch.clamp(old * self.factor, min=self.min_ratio * self._peak)
        self.multiplier.copy_(torch.where(reduce & (old - new > self.eps), new / self._peak, self.multiplier))
        self.cooldown_counter.copy_(torch.where(reduce, torch.full_like(bad, self.cooldown), self.cooldown_counter))
        self.num_bad.copy_(torch.where(reduce, torch.zeros_like(bad), bad))
        table = self.opt._schedule_tensor(self.multiplier.device)
        table[self._slot].copy_(self.multiplier)
