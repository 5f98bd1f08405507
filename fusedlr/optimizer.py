"""``fusedlr.AdamW``: a drop-in ``torch.optim.AdamW`` whose step also unscales (AMP), clips the
global gradient norm and applies an LR schedule, on the device, without a host-device sync."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from . import backends, distributed, precision
from .bucket import Bucket
from .control import GroupHyper, StepControl
from .distributed import ReduceKey
from .schedules import Schedule

__all__ = ["AdamW"]

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# GradScaler warns each step that its ``grad_scaler=`` keyword contract will change; fusedlr
# also honours the attribute contract (``grad_scale``/``found_inf``) that replaces it.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)


def _check_hyper(lr: object, betas: object, eps: object, weight_decay: object) -> None:
    if isinstance(lr, Tensor):
        raise ValueError("lr must be a float; for an LR that changes on the device pass schedule= instead")
    if not isinstance(lr, (int, float)) or not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not isinstance(eps, (int, float)) or not 0.0 <= eps < math.inf:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not isinstance(weight_decay, (int, float)) or not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _inverse(scale: Tensor, device: torch.device) -> Tensor:
    """``1 / scale`` as GradScaler computes it (in float64, then float32), on ``device`` without a sync."""
    return scale.double().reciprocal().float().to(device, non_blocking=True)


def _check_state_matches(p: Tensor, state: dict[str, Any]) -> None:
    """Refuse moments that do not lie over the parameter element for element (a mis-sharded checkpoint)."""
    for key in _STATE_KEYS + precision.STATE_KEYS:
        t = state.get(key)
        if t is not None and (
            distributed.is_dtensor(t) != distributed.is_dtensor(p)
            or distributed.local(t).shape != distributed.local(p).shape
            or t.device != p.device
        ):
            raise RuntimeError(
                f"fusedlr.AdamW: state '{key}' {tuple(distributed.local(t).shape)} on {t.device} does not match its "
                f"parameter {tuple(distributed.local(p).shape)} on {p.device} (a checkpoint saved with another "
                "sharding? load sharded state with torch.distributed.checkpoint)"
            )


@dataclass
class _Plan:
    """What a step launches, cached while the set of params with gradients stays the same."""

    flat: list[Tensor]  # every param of every group, in order
    owner: list[int]  # group index of each entry of flat
    present: list[bool]  # which of flat had a gradient when the plan was built
    buckets: list[tuple[int, Bucket, list[int], ReduceKey | None]]  # (group, bucket, indices into flat, norm reduction)
    has_dtensor: bool  # whether gradients must be unwrapped to their local shards


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with AMP unscaling, global norm clipping and an on-device
    LR schedule fused into two passes over the parameters.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
            With a ``schedule``, a group's ``lr`` is its peak LR and update ``k`` (the first is
            ``k=0``) applies ``lr * schedule(k)``; without one, ``param_groups[i]['lr']`` is applied
            as is, so any torch or Hugging Face LR scheduler drives it unchanged.
        schedule: a ``fusedlr.Schedule`` (``fusedlr.get_schedule(...)``), evaluated on the device.
            ``k`` counts updates actually applied: a step skipped by GradScaler does not advance it.
        max_grad_norm: clip the global L2 norm of all gradients of the optimizer to this, as
            ``clip_grad_norm_`` would, inside the update (gradients are left unmodified).
            ``grad_norm`` is the pre-clip norm of the last step (see the property).
        backend: "auto", "torch" (reference), "triton", "cuda" or "cpu" (compiled extension).
        master_weights: False; True: keep an fp32 copy of each bf16/fp16 param (``state['master_param']``),
            update it and write the param rounded to nearest; "remainder" (bf16 only): keep only
            the 16 low bits of that copy (int16 ``state['master_remainder']``), recovered exactly
            with the param.
        stochastic_rounding: round the bf16 values the update stores (params without master,
            bf16 moments) up or down at random, unbiased, from a counter-based RNG keyed by
            (``seed``, param index, step, element), so runs are reproducible.
        state_dtype: None (float32, float64 for float64 params) or torch.float32 / torch.bfloat16
            for ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq``.
        seed: the stochastic rounding seed, 0 <= seed < 2**32.
        ``master_weights``, ``stochastic_rounding`` and ``state_dtype`` are param group options
        (e.g. a group of fp32 params with ``master_weights=False``). Those modes run in the
        torch reference backend for now (exact spec: ``fusedlr.precision``).

    States ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq`` are float32 (float64 for float64
    params) whatever the param dtype unless ``state_dtype`` says otherwise; ``step`` is an int64
    tensor on the param's device.
    With ``torch.amp.GradScaler``, ``scaler.step(opt)`` unscales and checks for inf/NaN inside
    the step; a step with a non-finite gradient changes nothing.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        schedule: Schedule | None = None,
        max_grad_norm: float | None = None,
        backend: str = "auto",
        master_weights: bool | str = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        if schedule is not None and not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a fusedlr.Schedule (fusedlr.get_schedule(...)), got {schedule!r}")
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool)
            or not isinstance(max_grad_norm, (int, float))
            or not 0.0 < max_grad_norm < math.inf
        ):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
        if backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}")
        precision.check_options(master_weights, stochastic_rounding, state_dtype, "")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        self.seed = seed
        defaults = dict(
            lr=float(lr),
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=bool(amsgrad),
            maximize=bool(maximize),
            master_weights=master_weights,
            stochastic_rounding=stochastic_rounding,
            state_dtype=state_dtype,
        )
        super().__init__(params, defaults)
        self.schedule = schedule
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.backend = backend
        self._grad_norm: Tensor | None = None
        self._k: Tensor | None = None
        self._schedule_table: Tensor | None = None
        self._plan: _Plan | None = None
        self._impl: Any = None
        self._impl_device: torch.device | None = None
        device = self._device()
        if device is not None:  # made here, not in the first step, so that step can be traced or captured
            self._schedule_index(device)
            self._schedule_tensor(device)
            self._norm_buffer(device)

    # ------------------------------------------------------------------ state
    def _device(self) -> torch.device | None:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return None

    def _schedule_index(self, device: torch.device) -> Tensor:
        if self._k is None:
            self._k = torch.zeros((), dtype=torch.int64, device=device)
        elif self._k.device != device:  # the params moved: the index moves with them, never resets
            self._k = self._k.to(device)
        return self._k

    def _norm_buffer(self, device: torch.device) -> Tensor:
        if self._grad_norm is None or self._grad_norm.device != device:
            self._grad_norm = torch.full((), math.nan, dtype=torch.float32, device=device)
        return self._grad_norm

    @property
    def grad_norm(self) -> Tensor | None:
        """Global L2 norm of the (unscaled) gradients before clipping, from the last step that ran the
        reduction pass (clipping or AMP): a 0-d float32 device tensor updated in place each step (so it
        also updates under torch.compile and CUDA-graph replay); NaN until such a step has run."""
        return self._grad_norm

    def _schedule_tensor(self, device: torch.device) -> Tensor | None:
        if self.schedule is None:
            return None
        if self._schedule_table is None or self._schedule_table.device != device:
            self._schedule_table = self.schedule.as_tensor(device)
        return self._schedule_table

    @property
    def schedule_index(self) -> Tensor | None:
        """int64 0-d device tensor: updates applied so far, the ``k`` of the next update."""
        return self._k

    def scheduled_lr(self, group: int = 0) -> Tensor:
        """The LR the next update applies to ``param_groups[group]``, as a 0-d float64 device tensor."""
        device = self._device() or torch.device("cpu")
        lr = torch.full((), self.param_groups[group]["lr"], dtype=torch.float64, device=device)
        return lr if self.schedule is None else lr * self.schedule(self._schedule_index(device))

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        dt = precision.moment_dtype(p.dtype, group["state_dtype"])
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        for key in _STATE_KEYS:
            if key in state and state[key].dtype != dt:
                state[key] = state[key].to(dt)
        precision.init_master(p, state, group["master_weights"])

    def _validate(self, flat: list[Tensor], grads: list[Tensor | None]) -> None:
        """Every check that must pass before anything is modified."""
        device = None
        for p, g in zip(flat, grads):
            if g is None:
                continue
            if g.layout != torch.strided:
                raise RuntimeError("fusedlr.AdamW does not support sparse gradients; use torch.optim.SparseAdam")
            if torch.is_complex(p):
                raise RuntimeError(
                    "fusedlr.AdamW does not support complex parameters; "
                    "register torch.view_as_real(param) as the parameter instead"
                )
            distributed.check_pair(p, g)
            if p.dtype not in _SUPPORTED_DTYPES or g.dtype not in _SUPPORTED_DTYPES:
                raise RuntimeError(f"fusedlr.AdamW supports float32/float16/bfloat16/float64, got {p.dtype}")
            if g.shape != p.shape:
                raise RuntimeError(f"gradient shape {tuple(g.shape)} does not match parameter {tuple(p.shape)}")
            device = device or p.device
            if p.device != device or g.device != device:
                raise RuntimeError(
                    f"fusedlr.AdamW needs all parameters and gradients on one device, found {device} "
                    f"and {p.device}/{g.device}; create one optimizer per device"
                )

    def _build_plan(self, flat: list[Tensor], owner: list[int], grads: list[Tensor | None]) -> _Plan:
        """Validate, create missing state, and group the params with grads into buckets.

        Each bucket gets one int64 step counter tensor; ``state['step']`` of its params become views of it.
        """
        self._validate(flat, grads)
        members: dict[tuple[int, torch.dtype, torch.dtype, ReduceKey | None], list[int]] = {}
        for i, (p, g) in enumerate(zip(flat, grads)):
            if g is not None:
                members.setdefault((owner[i], p.dtype, g.dtype, distributed.reduce_key(p)), []).append(i)
        for gi, dtype, _, _ in members:
            precision.check_bucket(self.param_groups[gi], gi, dtype)
        buckets = []
        for (gi, dtype, _, reduce), idx in members.items():
            group = self.param_groups[gi]
            amsgrad = bool(group["amsgrad"])
            for i in idx:
                self._init_state(flat[i], group)
            states = [self.state[flat[i]] for i in idx]
            for i, state in zip(idx, states):
                _check_state_matches(flat[i], state)
            steps = torch.stack([s["step"].to(torch.int64) for s in states])
            for j, s in enumerate(states):
                s["step"] = steps[j]
            local = distributed.local
            bucket = Bucket(
                params=[local(flat[i]) for i in idx],
                exp_avgs=[local(s["exp_avg"]) for s in states],
                exp_avg_sqs=[local(s["exp_avg_sq"]) for s in states],
                max_exp_avg_sqs=[local(s["max_exp_avg_sq"]) for s in states] if amsgrad else None,
                steps=steps,
                precision=self._bucket_precision(group, dtype, states, idx, steps.device),
            )
            buckets.append((gi, bucket, idx, reduce))
        has_dtensor = any(distributed.is_dtensor(p) for p in flat)
        return _Plan(flat, owner, [g is not None for g in grads], buckets, has_dtensor)

    def _bucket_precision(
        self, group: dict[str, Any], dtype: torch.dtype, states: list[dict[str, Any]], idx: list[int],
        device: torch.device,
    ) -> precision.BucketPrecision | None:
        """The low-precision part of a bucket of ``dtype`` params (None in the default mode); ``idx`` are
        the params' indices."""
        master = group["master_weights"]
        default_moments = precision.moment_dtype(dtype, group["state_dtype"]) == precision.moment_dtype(dtype, None)
        if master is False and not group["stochastic_rounding"] and default_moments:
            return None
        local = distributed.local
        return precision.BucketPrecision(
            master=[local(s["master_param"]) for s in states] if master is True else None,
            remainder=[local(s["master_remainder"]) for s in states] if master == "remainder" else None,
            stochastic=bool(group["stochastic_rounding"]),
            seed=self.seed,
            pids=torch.tensor(idx, dtype=torch.int64, device=device),
        )

    def _plan_for_step(self) -> tuple[_Plan, list[Tensor | None]]:
        """The cached plan (rebuilt only when the set of params with grads changed) and this step's grads.

        Gradients are not kept between steps (that would hold a second set of them alive through the
        next backward). New gradient tensors are only checked for being dense: torch's ``.grad``
        setter and autograd guarantee their dtype, shape and device.
        """
        plan = self._plan
        if plan is None:
            flat = [p for group in self.param_groups for p in group["params"]]
            owner = [gi for gi, group in enumerate(self.param_groups) for _ in group["params"]]
        else:
            flat, owner = plan.flat, plan.owner
        grads = [p.grad for p in flat]
        if plan is None or [g is not None for g in grads] != plan.present:
            self._plan = plan = self._build_plan(flat, owner, grads)
        else:
            strided = torch.strided
            if not all([g is None or g.layout is strided for g in grads]):
                self._validate(flat, grads)
        if plan.has_dtensor:
            grads = [None if g is None else distributed.local(g) for g in grads]
        return plan, grads

    def _hyper(self, gi: int) -> GroupHyper:
        group = self.param_groups[gi]
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        return GroupHyper(
            lr=float(group["lr"]),
            beta1=float(group["betas"][0]),
            beta2=float(group["betas"][1]),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
        )

    # ------------------------------------------------------------------ AMP
    def _amp(self, device: torch.device, grad_scaler: Any) -> tuple[Tensor | None, Tensor | None, bool]:
        """(inv_scale, found_inf, check_inf): what AMP asks of this step.

        ``grad_scaler`` (GradScaler's keyword contract): unscale here unless the user already called
        ``scaler.unscale_(opt)``, in which case its recorded ``found_inf`` is used. Otherwise the
        attribute contract: ``self.grad_scale`` (None once unscaled) and ``self.found_inf``, which is
        honoured even when ``grad_scale`` is None.
        """
        if grad_scaler is not None:
            from torch.amp.grad_scaler import OptState

            opt_state = grad_scaler._per_optimizer_states[id(self)]
            if opt_state["stage"] is OptState.UNSCALED:
                recorded = list(opt_state["found_inf_per_device"].values())
                return None, sum(t.to(device, non_blocking=True) for t in recorded), False
            scale = grad_scaler._scale
            if scale is None:
                raise RuntimeError("GradScaler has no scale yet: call scaler.scale(loss).backward() before step")
            return _inverse(scale, device), None, True
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        inv_scale = None if grad_scale is None else _inverse(grad_scale, device)
        if found_inf is not None:
            found_inf = found_inf.to(device=device, dtype=torch.float32, non_blocking=True)
        return inv_scale, found_inf, False

    # ------------------------------------------------------------------ step
    @staticmethod
    def _grad_stats(impl: Any, work: list[Any], inv_scale: Tensor | None, device: torch.device) -> Tensor:
        """Pass 1 over every bucket: ``[global sum of squares, non-finite count]`` (float32, on device).

        Buckets of sharded DTensors accumulate into a buffer of their own, summed over the mesh
        dimensions they are sharded on before joining the total.
        """
        stats = torch.zeros(2, dtype=torch.float32, device=device)
        partial: dict[ReduceKey, Tensor] = {}
        for _, b, gs, reduce in work:
            out = stats if reduce is None else partial.setdefault(reduce, torch.zeros_like(stats))
            impl.grad_stats(b, gs, inv_scale, out)
        for reduce, out in partial.items():
            distributed.all_reduce_stats(out, reduce)
            stats += out
        return stats

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, grad_scaler: Any = None) -> float | None:  # type: ignore[override]
        """One fused update of every parameter that has a gradient.

        ``grad_scaler`` is passed by ``torch.amp.GradScaler.step``; do not pass it yourself.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan, grads = self._plan_for_step()
        if not plan.buckets:
            return loss
        device = plan.buckets[0][1].device
        if self._impl is None or self._impl_device != device:
            self._impl = backends.resolve(self.backend, device)
            self._impl_device = device
        impl = self._impl
        work = [(self._hyper(gi), b, [grads[i] for i in idx], reduce) for gi, b, idx, reduce in plan.buckets]

        inv_scale, found_inf, check_inf = self._amp(device, grad_scaler)
        stats = None
        if self.max_grad_norm is not None or check_inf:
            stats = self._grad_stats(impl, work, inv_scale, device)
            torch.sqrt(stats[0], out=self._norm_buffer(device))
        if check_inf:
            assert stats is not None
            found_inf = (stats[1] > 0).to(torch.float32)
            grad_scaler._per_optimizer_states[id(self)]["found_inf_per_device"][device] = found_inf

        ctrl = StepControl(
            k=self._schedule_index(device),
            schedule=self.schedule,
            schedule_table=self._schedule_tensor(device),
            stats=stats,
            max_norm=self.max_grad_norm,
            inv_scale=inv_scale,
            found_inf=found_inf,
        )
        applied: Tensor | int = 1 if found_inf is None else (found_inf <= 0).to(torch.int64)
        for hyper, b, gs, _ in work:
            b.steps.add_(applied)
            impl.adamw_update(b, gs, hyper, ctrl)
        ctrl.k.add_(applied)
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's format (``step`` as a float64 CPU tensor), plus the schedule index and seed.

        The low-precision modes add their state keys (``master_param``, ``master_remainder``) and
        param group options (``master_weights``, ``stochastic_rounding``, ``state_dtype``), which
        torch.optim.AdamW carries along unused when it loads this state dict.
        """
        sd = super().state_dict()
        sd["state"] = {
            i: {key: (v.to("cpu", torch.float64) if key == "step" else v) for key, v in s.items()}
            for i, s in sd["state"].items()
        }
        sd["fusedlr"] = {"schedule_index": 0 if self._k is None else int(self._k), "seed": self.seed}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of ``fusedlr.AdamW`` or ``torch.optim.AdamW`` (any of its modes).

        States are kept in float32 (float64 for float64 params, or the group's ``state_dtype``)
        whatever dtype they were saved in. The low-precision options of the param groups stay
        this optimizer's: a master missing from the state dict starts from the param, and a
        full master and a remainder convert into each other exactly. Without a saved schedule
        index (a torch state dict), the index resumes at the largest per-parameter step, the
        number of updates applied when every parameter trained every step. The saved ``seed``
        (stochastic rounding) replaces this optimizer's, so that a resumed run draws the same bits.
        """
        saved = state_dict["state"]
        params_of = {
            pid: p
            for saved_group, group in zip(state_dict["param_groups"], self.param_groups)
            for pid, p in zip(saved_group["params"], group["params"])
        }
        group_of = {
            pid: group
            for saved_group, group in zip(state_dict["param_groups"], self.param_groups)
            for pid in saved_group["params"]
        }
        options = [{key: group[key] for key in precision.GROUP_DEFAULTS} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, kept in zip(self.param_groups, options):
            group.update(kept)
        largest = 0
        for pid, s in saved.items():
            p = params_of[pid]
            dt = precision.moment_dtype(p.dtype, group_of[pid]["state_dtype"])
            state = self.state[p]
            for key, value in s.items():
                if key == "step":
                    step = int(value) if not isinstance(value, Tensor) else int(value.item())
                    largest = max(largest, step)
                    state["step"] = torch.tensor(step, dtype=torch.int64, device=p.device)
                elif key in _STATE_KEYS:
                    state[key] = value.to(device=p.device, dtype=dt, copy=True)
                elif key == "master_param":
                    state[key] = value.to(device=p.device, dtype=torch.float32, copy=True)
                elif key == "master_remainder":
                    state[key] = value.to(device=p.device, dtype=torch.int16, copy=True)
        index = state_dict.get("fusedlr", {}).get("schedule_index", largest)
        self.seed = int(state_dict.get("fusedlr", {}).get("seed", self.seed))
        device = self._device()
        self._k = None if device is None else torch.tensor(int(index), dtype=torch.int64, device=device)
        self._plan = None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "seed": self.seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            for key, default in precision.GROUP_DEFAULTS.items():
                group.setdefault(key, default)
        self.__dict__.setdefault("seed", 0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        options = [param_group.get(key, self.defaults[key]) for key in precision.GROUP_DEFAULTS]
        precision.check_options(*options, f"param group {len(self.param_groups)}: ")
        super().add_param_group(param_group)
        self._plan = None
