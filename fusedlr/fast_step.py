"""The eager fast path of ``fusedlr.AdamW.step`` on the compiled CPU and CUDA backends: one C++ call per step.

``fusedlr._C.StepPlan`` (csrc/step_plan.cpp) is built once per launch plan (``fusedlr.plan``) and holds the
params, states and step counters of every bucket. Each step it reads every parameter's ``.grad`` in C++,
checks everything ``fusedlr.plan.scan`` checks against the plan's signature and, when all holds, runs pass
1 (clipping or AMP) and pass 2 of every bucket with the CPU kernels themselves (no dispatcher), bumping
the version counters the ops bump. When anything changed it writes nothing, and the general path runs
(which rebuilds the plan, or refuses a bad gradient with its message). Python's work per step is
O(number of param groups): the hyperparameters (cached on the group values), AMP, the schedule index.

Only the eager ``cpu`` and ``cuda`` backends take it, for plans whose every bucket the compiled kernels run as
they are (the low-precision modes included; no reference fallback, no DTensor or complex parameter);
``torch.compile`` traces the op path.

On ``cuda`` (a backend with ``fast_path``, see ``fusedlr.extension.cuda.fast_path``) it runs the op path's folded
step (``AdamW._prepare_folded``): the same launches (pass 2: one per launch set, ``AdamW._launch_sets``) through
the table of csrc/cuda/launchers.h, on the op path's own cached device tables, which C++ rewrites in their host
mirrors and uploads (async, from pinned memory) only when a pointer changed: no dispatcher and no host-device sync
per step. It declines (the op path runs) while a CUDA graph is being captured, with a step history, and with a
``grad_scale`` attribute that is not float32.

``FUSEDLR_FAST_PATH=0`` in the environment (read at import, ``ENABLED``) sends every step to the op path: the
same results (tests/test_fast_step*.py hold the two paths bit for bit equal), only more host work.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from . import extension
from .extension._common import _float32
from .plan import Plan, current
from .precision import BucketPrecision
from .reference import clip_coefficient

__all__ = ["ENABLED", "step"]

#: Whether eager steps may take the fast path (False: ``FUSEDLR_FAST_PATH=0`` in the environment at import).
ENABLED = os.environ.get("FUSEDLR_FAST_PATH", "1") != "0"

_CPU = torch.device("cpu")


class _Fast:
    """What the fast path keeps for one plan (in ``AdamW._step_cache['fast']``, never pickled)."""

    __slots__ = ("plan", "native", "device", "stats", "keys", "hypers")

    def __init__(self, plan: Plan, native: Any) -> None:
        self.plan = plan
        self.native = native  # fusedlr._C.StepPlan, or None: this plan takes the general path
        self.device = plan.buckets[0][1].device if plan.buckets else _CPU  # of a plan with launchers (``launch``)
        self.stats = torch.zeros(2, dtype=torch.float32)  # pass 1's [sum of squares, non-finite count]
        self.keys: tuple | None = None
        self.hypers: tuple = ()


def _native_plan(opt: Any, plan: Plan) -> Any:
    """The ``fusedlr._C.StepPlan`` of ``plan``, or None when the fast path cannot run it."""
    from .extension import cpu
    from .extension._common import compiled_ok

    impl = opt._step_cache["impl"]
    step_plan = getattr(extension._C, "StepPlan", None)
    launch = impl is not cpu and hasattr(impl, "fast_path")
    if (
        step_plan is None
        or not (impl is cpu or launch)
        or plan.unwrap
        or not plan.buckets
        or not isinstance(plan.signature, bytes)
        or any(reduce is not None for _, _, _, reduce in plan.buckets)
        or (impl is cpu and any(b.device.type != "cpu" for _, b, _, _ in plan.buckets))
        or not all(impl.folds(b, []) if launch else compiled_ok(b, [], cpu.NAME) for _, b, _, _ in plan.buckets)
    ):
        return None
    buckets = [
        (gi, idx, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, b.steps, _precision(b.precision))
        for gi, b, idx, _ in plan.buckets
    ]
    kwargs: dict[str, Any] = {}
    if launch:
        device_buckets = [b for _, b, _, _ in plan.buckets]
        runs = _dtype_runs(device_buckets)
        grads = [[plan.flat[j].grad for j in idx] for _, _, idx, _ in plan.buckets]
        if any(g is None for gs in grads for g in gs):
            return None  # StepPlan refuses a bucket's param without a gradient too
        sets = opt._launch_sets(impl, plan, grads)  # the op path's, which it then finds cached
        launchers, updates, stats = impl.fast_path(device_buckets, runs, sets, device_buckets[0].device)
        if not launchers:
            return None
        kwargs = dict(
            launchers=launchers,
            runs=[(members, *s) for members, s in zip(runs, stats)],
            sets=[(members, *u) for members, u in zip(sets, updates)],
        )
    try:
        return step_plan(plan.flat, plan.signature, buckets, len(opt.param_groups), **kwargs)
    except ValueError:  # e.g. grads of another dtype than their params: the reference runs those buckets
        return None


def _dtype_runs(buckets: list[Any]) -> list[list[int]]:
    """The buckets of each pass-1 launch of the op path's folded step (``fusedlr.extension._common.dtype_runs``
    over gradients of their params' dtype, as a plan the fast path runs has them): indices, by dtype."""
    runs: dict[torch.dtype, list[int]] = {}
    for i, b in enumerate(buckets):
        runs.setdefault(b.params[0].dtype, []).append(i)
    return list(runs.values())


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
    if not ENABLED:
        return False
    cache = opt._step_cache
    plan = cache["plan"]
    if plan is None or not current(opt, plan):
        return False
    fast = cache.get("fast")
    if fast is None or fast.plan is not plan:
        fast = _Fast(plan, _native_plan(opt, plan))
        cache["fast"] = fast
    if fast.native is None:
        return False
    if hasattr(cache["impl"], "fast_path"):  # a plan with launchers
        return _launch(opt, fast, grad_scaler)
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


def _launch(opt: Any, fast: _Fast, grad_scaler: Any) -> bool:
    """``step`` on a plan with launchers: the folded step of ``AdamW._prepare_folded``, in one C++ call."""
    device = fast.device
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False  # the op path captures (a table upload must not be captured)
    if not opt._options_fold(grad_scaler):
        return False  # the op path's unfolded step runs
    hypers = _hypers(opt, fast, device)
    opt._warn_on_double_schedule()
    scale, found_inf, check_inf = opt._amp_scale(device, grad_scaler)
    if scale is not None:
        scale = scale.to(device, non_blocking=True)
    stats = opt._private_buffer("stats", (2,), device) if opt.max_grad_norm is not None or check_inf else None
    found_out = opt._private_buffer("found_inf", (), device) if check_inf else None
    ran = fast.native.launch(
        hypers,
        opt._schedule_index(device),
        opt._schedule_tensor(device),
        opt.max_grad_norm,
        scale,
        _float32(found_inf),
        stats,
        found_out,
        opt._applied_lr_buffer(device),
        opt._norm_buffer(device) if stats is not None else None,
        check_inf,
    )
    if ran and check_inf:  # GradScaler.update() reads it
        grad_scaler._per_optimizer_states[id(opt)]["found_inf_per_device"][device] = found_out
    return ran
