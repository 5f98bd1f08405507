"""The launch plan of ``fusedlr.AdamW.step``: which buckets each step launches, cached between steps.

A plan is valid while everything it was built from is unchanged. Each step re-checks that with one
pass over the parameters (``scan``: in C++ when ``fusedlr._C`` is built, else in Python): each
parameter's storage address, element count, dtype and device (so ``p.data = ...``, ``module.to()``,
``module.half()`` rebuild it, and no backend keeps addressing a parameter's old storage), which
parameters have a gradient and its dtype; and with one pass over ``param_groups`` and ``optimizer.state``
(``fusedlr.watch``: the same lists, dicts, parameters and state entries, by identity), so that replacing a
state tensor, a parameter's state, a group's ``params`` or an option like ``amsgrad``, ``state.clear()``
or a new state mapping take effect at the next step, as with torch.optim.AdamW. The first pass also refuses
a gradient the kernels cannot read (sparse, another shape, device or dtype) before anything is modified.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch
from torch import Tensor

from . import distributed, precision, watch
from .bucket import Bucket
from .distributed import ReduceKey

__all__ = [
    "Plan",
    "STATE_KEYS",
    "SUPPORTED_DTYPES",
    "check_state_matches",
    "current",
    "plan_for_step",
    "real",
    "scan",
    "state_dtype",
    "validate",
]

STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64, torch.complex128)


@dataclass
class Plan:
    """What a step launches, and what it was built from (see the module docstring)."""

    flat: list[Tensor]  # every param of every group, in order
    owner: list[int]  # group index of each entry of flat
    signature: Hashable  # ``scan``'s signature of flat when the plan was built
    buckets: list[tuple[int, Bucket, list[int], ReduceKey | None]]  # (group, bucket, indices into flat, reduction)
    unwrap: bool  # whether gradients must be mapped to what kernels read (DTensor shards, complex real views)
    watched: tuple  # ``fusedlr.watch.snapshot`` of the param groups and state the plan was built from
    watch_memo: bytearray = field(default_factory=bytearray)  # what ``fusedlr.watch.unchanged`` keeps between steps


def state_dtype(p: Tensor, override: torch.dtype | None = None) -> torch.dtype:
    """The dtype of a parameter's moments: ``override`` (its group's ``state_dtype``) when given, else
    float32, float64 for float64 params, complex64/complex128 for complex params (updated through
    ``torch.view_as_real``, as torch's AdamW does)."""
    if override is not None:
        return override
    if p.is_complex():
        return torch.complex128 if p.dtype == torch.complex128 else torch.complex64
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def real(t: Tensor) -> Tensor:
    """What the kernels read and write for ``t``: a complex tensor's real view (a trailing dim of 2:
    real, imaginary parts; same storage), anything else as is."""
    return torch.view_as_real(t) if t.is_complex() else t


def _needs_unwrap(p: Tensor) -> bool:
    return distributed.is_dtensor(p) or p.is_complex()


def _compiled_scan() -> Any:
    from . import extension

    return getattr(extension._C, "scan_grads", None) if extension.load_error() is None else None


def scan(flat: list[Tensor], unwrap: bool) -> tuple[list[Tensor | None], Hashable, int]:
    """``(grads, signature, bad)``: each param's ``.grad``, what a cached plan depends on, and the index of
    the first gradient the kernels cannot read (-1: none). One C++ pass when the extension is built
    (and no parameter is a DTensor or complex)."""
    native = None if unwrap or torch.compiler.is_compiling() else _compiled_scan()
    if native is not None:
        return native(flat)
    grads = [p.grad for p in flat]
    bad = next((i for i, (p, g) in enumerate(zip(flat, grads)) if g is not None and _grad_reason(p, g)), -1)
    local = distributed.local
    if torch.compiler.is_compiling():  # traced tensors have no address; Dynamo guards on the tensors instead
        signature: Hashable = tuple((p.dtype, p.device, p.numel(), None if g is None else g.dtype) for p, g in zip(flat, grads))
    else:
        signature = tuple(
            (local(p).data_ptr(), p.dtype, p.device, p.numel(), None if g is None else g.dtype) for p, g in zip(flat, grads)
        )
    return grads, signature, bad


def _grad_reason(p: Tensor, g: Tensor) -> str | None:
    """Why the kernels cannot read ``g`` as the gradient of ``p`` (None: they can)."""
    if g.layout != torch.strided:
        return "fusedlr.AdamW does not support sparse gradients; use torch.optim.SparseAdam"
    if p.dtype not in SUPPORTED_DTYPES or g.dtype not in SUPPORTED_DTYPES:
        return (
            f"fusedlr.AdamW supports float32/float16/bfloat16/float64 (and complex64/complex128) parameters and "
            f"gradients, got a {g.dtype} gradient for a {p.dtype} parameter"
        )
    if p.is_complex() != g.is_complex():
        return f"gradient dtype {g.dtype} does not match parameter dtype {p.dtype}"
    if g.shape != p.shape:
        return f"gradient shape {tuple(g.shape)} does not match parameter {tuple(p.shape)}"
    if g.device != p.device:
        return f"gradient on {g.device} for a parameter on {p.device}"
    return None


def validate(flat: list[Tensor], grads: list[Tensor | None]) -> None:
    """Every check of the gradients that must pass before anything is modified."""
    device = None
    for i, (p, g) in enumerate(zip(flat, grads)):
        if g is None:
            continue
        distributed.check_pair(p, g)
        reason = _grad_reason(p, g)
        if reason is not None:
            raise RuntimeError(f"{reason} (parameter {i}; nothing was updated)")
        device = device or p.device
        if p.device != device:
            raise RuntimeError(
                f"fusedlr.AdamW needs all parameters and gradients on one device, found {device} "
                f"and {p.device}; create one optimizer per device"
            )


def check_state_matches(p: Tensor, state: dict[str, Any]) -> None:
    """Refuse moments that do not lie over the parameter element for element (a mis-sharded checkpoint)."""
    for key in STATE_KEYS + precision.STATE_KEYS:
        t = state.get(key)
        if t is not None and (
            distributed.is_dtensor(t) != distributed.is_dtensor(p) or distributed.local(t).shape != distributed.local(p).shape
        ):
            raise RuntimeError(
                f"fusedlr.AdamW: state '{key}' {tuple(distributed.local(t).shape)} does not match its "
                f"parameter {tuple(distributed.local(p).shape)} (a checkpoint saved with another "
                "sharding? load sharded state with torch.distributed.checkpoint)"
            )


def _follow_param(p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """Move the moments to the param's device and state dtype (after ``module.to()``, ``.half()``, ``.double()``)."""
    dt = state_dtype(p, group["state_dtype"])
    for key in STATE_KEYS:
        t = state.get(key)
        if t is not None and not distributed.is_dtensor(t) and (t.device != p.device or t.dtype != dt):
            state[key] = t.to(device=p.device, dtype=dt)
    for key in precision.STATE_KEYS:
        t = state.get(key)
        if t is not None and not distributed.is_dtensor(t) and t.device != p.device:
            state[key] = t.to(device=p.device)


def _point_step(state: dict[str, Any], steps: Tensor, j: int, shared: set[int]) -> None:
    """Make ``state['step']`` the view ``steps[j]`` of its bucket's counters: the tensor already there, pointed at
    that element, when it can be (a plain int64 0-d tensor on the device, outside torch.compile, in no other
    parameter's state: ``shared`` holds the ids of those), so that a reference to it held across a plan rebuild
    keeps counting, as torch's own step tensor does; else a new view."""
    step = state["step"]
    if (
        id(step) not in shared
        and type(step) is Tensor
        and step.dtype == torch.int64
        and step.dim() == 0
        and step.device == steps.device
        and not step.is_inference()
        and not torch.compiler.is_compiling()
    ):
        step.set_(steps.untyped_storage(), steps.storage_offset() + j * steps.stride(0), (), ())
    else:
        state["step"] = steps[j]


def _build(opt: Any, flat: list[Tensor], owner: list[int], grads: list[Tensor | None], signature: Hashable) -> Plan:
    """Validate, create missing state, and group the params with grads into buckets.

    Each bucket gets one int64 step counter tensor; ``state['step']`` of its params become views of it
    (``_point_step``).
    """
    validate(flat, grads)
    members: dict[tuple[int, torch.dtype, torch.dtype, ReduceKey | None], list[int]] = {}
    for i, (p, g) in enumerate(zip(flat, grads)):
        if g is not None:
            members.setdefault((owner[i], real(p).dtype, real(g).dtype, distributed.reduce_key(p)), []).append(i)
    for gi, dtype, _, _ in members:
        precision.check_bucket(opt.param_groups[gi], gi, dtype)
    buckets = []
    held = Counter(id(s.get("step")) for s in opt.state.values() if isinstance(s, dict) and "step" in s)
    shared = {i for i, n in held.items() if n > 1}

    def local(t: Tensor) -> Tensor:
        return real(distributed.local(t))

    for (gi, _, _, reduce), idx in members.items():
        group = opt.param_groups[gi]
        amsgrad = bool(group["amsgrad"])
        for i in idx:
            check_state_matches(flat[i], opt.state[flat[i]])
        for i in idx:
            _follow_param(flat[i], opt.state[flat[i]], group)
            opt._init_state(flat[i], group)
        states = [opt.state[flat[i]] for i in idx]
        device = flat[idx[0]].device
        steps = torch.stack([s["step"].to(device=device, dtype=torch.int64) for s in states])
        for j, s in enumerate(states):
            _point_step(s, steps, j, shared)
        bucket = Bucket(
            params=[local(flat[i]) for i in idx],
            exp_avgs=[local(s["exp_avg"]) for s in states],
            exp_avg_sqs=[local(s["exp_avg_sq"]) for s in states],
            max_exp_avg_sqs=[local(s["max_exp_avg_sq"]) for s in states] if amsgrad else None,
            steps=steps,
            precision=opt._bucket_precision(group, flat[idx[0]], states, idx, device),
        )
        buckets.append((gi, bucket, idx, reduce))
    unwrap = any(_needs_unwrap(p) for p in flat)
    return Plan(flat, owner, signature, buckets, unwrap, watch.snapshot(opt.param_groups, opt.state))


def current(opt: Any, plan: Plan) -> bool:
    """Whether ``opt.param_groups`` and ``opt.state`` still hold what ``plan`` was built from (``fusedlr.watch``)."""
    return watch.unchanged(opt.param_groups, opt.state, plan.watched, plan.watch_memo)


def plan_for_step(opt: Any, plan: Plan | None) -> tuple[Plan, list[Tensor | None]]:
    """The plan for this step (``plan`` when still valid, else a new one) and this step's grads.

    Gradients are not kept between steps (that would hold a second set of them alive through the
    next backward); a bad gradient raises here, before anything is modified.
    """
    if plan is not None and not current(opt, plan):
        plan = None
    if plan is None:
        flat = [p for group in opt.param_groups for p in group["params"]]
        owner = [gi for gi, group in enumerate(opt.param_groups) for _ in group["params"]]
        unwrap = any(_needs_unwrap(p) for p in flat)
    else:
        flat, owner, unwrap = plan.flat, plan.owner, plan.unwrap
    grads, signature, bad = scan(flat, unwrap)
    if bad >= 0:
        validate(flat, grads)
        raise AssertionError(f"scan and validate disagree on the gradient of parameter {bad}")
    if plan is None or signature != plan.signature:
        plan = _build(opt, flat, owner, grads, signature)
    if plan.unwrap:
        grads = [None if g is None else real(distributed.local(g)) for g in grads]
    return plan, grads
