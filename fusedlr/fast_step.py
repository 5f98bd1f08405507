"""The eager fast path of ``fusedlr.AdamW.step`` on the compiled CPU backend: one C++ call per step.

``fusedlr._C.StepPlan`` (csrc/step_plan.cpp) is built once per launch plan (``fusedlr.plan``) and holds the
params, states and step counters of every bucket. Each step it reads every parameter's ``.grad`` in C++,
checks everything ``fusedlr.plan.scan`` checks against the plan's signature and, when all holds, runs pass
1 (clipping or AMP) and pass 2 of every bucket with the CPU kernels themselves (no dispatcher), bumping
the version counters the ops bump. When anything changed it writes nothing, and the general path runs
(which rebuilds the plan, or refuses a bad gradient with its message). Python's work per step is
O(number of param groups): the hyperparameters (cached on the group values), AMP, the schedule index.

Only the eager ``cpu`` backend takes it, for plans whose every bucket the compiled kernels run as they
are (the low-precision modes included; no reference fallback, no DTensor or complex parameter);
``torch.compile`` traces the op path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import extension
from .plan import Plan
from .precision import BucketPrecision
from .reference import clip_coefficient

__all__ = ["step"]

_CPU = torch.device("cpu")


class _Fast:
    """What the fast path keeps for one plan (in ``AdamW._step_cache['fast']``, never pickled)."""

    __slots__ = ("plan", "native", "stats", "keys", "hypers")

    def __init__(self, plan: Plan, native: Any) -> None:
        self.plan = plan
        self.native = native  # fusedlr._C.StepPlan, or None: this plan takes the general path
        self.stats = torch.zeros(2, dtype=torch.float32)  # pass 1's [sum of squares, non-finite count]
        self.keys: tuple | None = None
        self.hypers: tuple = ()


def _native_plan(opt: Any, plan: Plan) -> Any:
    """The ``fusedlr._C.StepPlan`` of ``plan``, or None when the fast path cannot run it."""
    from .extension import cpu
    from .extension._common import compiled_ok

    cache = opt._step_cache
    step_plan = getattr(extension._C, "StepPlan", None)
    if (
        step_plan is None
        or cache["impl"] is not cpu
        or plan.unwrap
        or not plan.buckets
        or not isinstance(plan.signature, bytes)
        or any(b.device.type != "cpu" or reduce is not None for _, b, _, reduce in plan.buckets)
        or not all(compiled_ok(b, [], cpu.NAME) for _, b, _, _ in plan.buckets)
    ):
        return None
    buckets = [
        (gi, idx, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, b.steps, _precision(b.precision))
        for gi, b, idx, _ in plan.buckets
    ]
    try:
        return step_plan(plan.flat, plan.signature, buckets, len(opt.param_groups))
    except ValueError:  # e.g. grads of another dtype than their params: the reference runs those buckets
        return None


def _precision(prec: BucketPrecision | None) -> tuple | None:
    """A bucket's low-precision modes as ``StepPlan`` takes them: (masters, remainders, pids, seed, stochastic)."""
    if prec is None:
        return None
    return (prec.master, prec.remainder, prec.pids, prec.seed, prec.stochastic)


def _group_key(group: dict[str, Any]) -> tuple:
    lr = group["lr"]
    return (
        ("tensor", id(lr)) if isinstance(lr, Tensor) else lr,
        group["betas"],
        group["eps"],
        group["weight_decay"],
        group["maximize"],
    )


def _hypers(opt: Any, fast: _Fast, device: torch.device) -> tuple:
    """Per param group: ``(lr, lr tensor or None, beta1, beta2, eps, weight_decay, maximize)`` as the kernels
    take them (None for a group without a bucket), checked by ``AdamW._hyper`` when the group values change."""
    keys = tuple([_group_key(g) for g in opt.param_groups])
    if keys != fast.keys:
        used = {gi for gi, _, _, _ in fast.plan.buckets}
        hypers = []
        for gi in range(len(opt.param_groups)):
            if gi not in used:
                hypers.append(None)
                continue
            h = opt._hyper(gi, device)
            lr_tensor = h.lr if isinstance(h.lr, Tensor) else None
            lr = 0.0 if lr_tensor is not None else h.lr
            hypers.append((lr, lr_tensor, h.beta1, h.beta2, h.eps, h.weight_decay, h.maximize))
        fast.keys, fast.hypers = keys, tuple(hypers)
    return fast.hypers


def step(opt: Any, grad_scaler: Any) -> bool:
    """Run ``opt``'s step on the fast path; False when it does not apply (nothing was updated then, and the
    caller runs the general path). Never call it while compiling."""
    cache = opt._step_cache
    plan = cache["plan"]
    if plan is None or opt.state is not plan.state or len(opt.state) != plan.n_state:
        return False
    fast = cache.get("fast")
    if fast is None or fast.plan is not plan:
        fast = _Fast(plan, _native_plan(opt, plan))
        cache["fast"] = fast
    if fast.native is None:
        return False
    device = _CPU
    hypers = _hypers(opt, fast, device)
    opt._warn_on_double_schedule()
    inv_scale, found_inf, check_inf = opt._amp(device, grad_scaler)
    need_stats = opt.max_grad_norm is not None or check_inf
    found_out = torch.empty((), dtype=torch.float32) if check_inf else None
    k = opt._schedule_index(device)
    history = opt._history_buffer(device)
    ran = fast.native.step(
        hypers,
        k,
        opt._schedule_tensor(device),
        opt.max_grad_norm,
        inv_scale,
        found_inf,
        fast.stats if need_stats else None,
        found_out,
        opt._applied_lr_buffer(device),
        opt._norm_buffer(device) if need_stats else None,
        history is None,
    )
    if not ran:
        return False
    if check_inf:
        found_inf = found_out
        grad_scaler._per_optimizer_states[id(opt)]["found_inf_per_device"][device] = found_inf
    if history is not None:
        ctrl = opt._step_control(device, fast.stats if need_stats else None, inv_scale, found_inf)
        history.record(
            k,
            opt._applied_lr_buffer(device),
            opt._norm_buffer(device) if need_stats else None,
            clip_coefficient(ctrl),
            None if found_inf is None else found_inf > 0,
        )
        k.add_(1 if found_inf is None else (found_inf <= 0).to(torch.int64))
    return True
