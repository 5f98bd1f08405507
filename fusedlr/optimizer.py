"""``fusedlr.AdamW``: a drop-in ``torch.optim.AdamW`` whose step also unscales (AMP), clips the
global gradient norm and applies an LR schedule, on the device, without a host-device sync."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from . import backends, distributed
from .control import GroupHyper, StepControl
from .distributed import ReduceKey
from .plan import STATE_KEYS, Plan, plan_for_step, state_dtype
from .schedules import Schedule

__all__ = ["AdamW"]


# GradScaler warns each step that its ``grad_scaler=`` keyword contract will change; fusedlr
# also honours the attribute contract (``grad_scale``/``found_inf``) that replaces it.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)


def _check_hyper(lr: object, betas: object, eps: object, weight_decay: object) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"Tensor lr must be a one-element float32/float64 tensor, got shape {tuple(lr.shape)} {lr.dtype}"
            )
    elif not isinstance(lr, (int, float)) or not 0.0 <= lr < math.inf:
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

    States ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq`` are float32 (float64 for float64
    params) whatever the param dtype; ``step`` is an int64 tensor on the param's device.
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
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        if isinstance(lr, Tensor) and not 0.0 <= float(lr) < math.inf:  # read once, at construction
            raise ValueError(f"Invalid learning rate: {lr}")
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
        defaults = dict(
            lr=lr if isinstance(lr, Tensor) else float(lr),
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=bool(amsgrad),
            maximize=bool(maximize),
        )
        super().__init__(params, defaults)
        self.schedule = schedule
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.backend = backend
        self._grad_norm: Tensor | None = None
        self._k: Tensor | None = None
        self._schedule_table: Tensor | None = None
        # What step() caches (the plan, the backend): a dict, so that step() mutates no attribute
        # (Dynamo before torch 2.13 cannot trace an attribute store on the optimizer).
        self._step_cache: dict[str, Any] = {"plan": None, "impl": None, "impl_device": None}
        self._applied_lr: Tensor | None = None
        device = self._device()
        if device is not None:  # made here, not in the first step, so that step can be traced or captured
            self._schedule_index(device)
            self._schedule_tensor(device)
            self._norm_buffer(device)
            self._applied_lr_buffer(device)

    @property
    def _plan(self) -> Plan | None:
        """The cached launch plan (``fusedlr.plan``); set to None to rebuild it at the next step."""
        return self._step_cache["plan"]

    @_plan.setter
    def _plan(self, plan: Plan | None) -> None:
        self._step_cache["plan"] = plan

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

    def _applied_lr_buffer(self, device: torch.device) -> Tensor:
        n = len(self.param_groups)
        buf = self._applied_lr
        if buf is None or buf.device != device or buf.numel() != n:
            new = torch.full((n,), math.nan, dtype=torch.float64, device=device)
            if buf is not None:
                kept = min(n, buf.numel())
                new[:kept] = buf[:kept].to(device)
            self._applied_lr = buf = new
        return buf

    def applied_lr(self, group: int = 0) -> Tensor:
        """The LR the last applied update of ``param_groups[group]`` used (``lr * sched(k)`` with a
        schedule), as a 0-d float64 device tensor written by the update pass itself: a view of a
        buffer updated in place (so it also updates under torch.compile and CUDA-graph replay),
        unchanged by a step that GradScaler skips, NaN before the group's first applied update."""
        if self._applied_lr is None:
            self._applied_lr_buffer(self._device() or torch.device("cpu"))
        assert self._applied_lr is not None
        return self._applied_lr[group]

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
        base = self.param_groups[group]["lr"]
        if isinstance(base, Tensor):
            lr = base.to(device=device, dtype=torch.float64, copy=True)
        else:
            lr = torch.full((), base, dtype=torch.float64, device=device)
        return lr if self.schedule is None else lr * self.schedule(self._schedule_index(device))

    def _init_state(self, p: Tensor, amsgrad: bool) -> None:
        state = self.state[p]
        if len(state) == 0:
            dt = state_dtype(p)
            state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])

    def _hyper(self, gi: int, device: torch.device) -> GroupHyper:
        group = self.param_groups[gi]
        lr = group["lr"]
        _check_hyper(lr, group["betas"], group["eps"], group["weight_decay"])
        if isinstance(lr, Tensor) and lr.device != device:
            raise ValueError(
                f"param_groups[{gi}]['lr'] is a tensor on {lr.device} but the parameters are on {device}: "
                f"create it on {device} (the kernels read it there)"
            )
        return GroupHyper(
            lr=lr if isinstance(lr, Tensor) else float(lr),
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
        for _, b, gs, reduce, _ in work:
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
        cache = self._step_cache
        plan, grads = plan_for_step(self, cache["plan"])
        cache["plan"] = plan
        if not plan.buckets:
            return loss
        device = plan.buckets[0][1].device
        if cache["impl"] is None or cache["impl_device"] != device:
            cache["impl"] = backends.resolve(self.backend, device)
            cache["impl_device"] = device
        impl = cache["impl"]
        applied_lr = self._applied_lr_buffer(device)
        work = [
            (self._hyper(gi, device), b, [grads[i] for i in idx], reduce, applied_lr[gi])
            for gi, b, idx, reduce in plan.buckets
        ]

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
        for hyper, b, gs, _, lr_out in work:
            b.steps.add_(applied)
            impl.adamw_update(b, gs, hyper, ctrl, lr_out)
        ctrl.k.add_(applied)
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's format (``step`` as a float64 CPU tensor), plus the schedule index."""
        sd = super().state_dict()
        sd["state"] = {
            i: {key: (v.to("cpu", torch.float64) if key == "step" else v) for key, v in s.items()}
            for i, s in sd["state"].items()
        }
        sd["fusedlr"] = {"schedule_index": 0 if self._k is None else int(self._k)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of ``fusedlr.AdamW`` or ``torch.optim.AdamW`` (any of its modes).

        States are kept in float32 (float64 for float64 params) whatever dtype they were saved in.
        Without a saved schedule index (a torch state dict), the index resumes at the largest
        per-parameter step, the number of updates applied when every parameter trained every step.
        """
        saved = state_dict["state"]
        params_of = {
            pid: p
            for saved_group, group in zip(state_dict["param_groups"], self.param_groups)
            for pid, p in zip(saved_group["params"], group["params"])
        }
        super().load_state_dict(state_dict)
        largest = 0
        for pid, s in saved.items():
            p = params_of[pid]
            dt = state_dtype(p)
            state = self.state[p]
            for key, value in s.items():
                if key == "step":
                    step = int(value) if not isinstance(value, Tensor) else int(value.item())
                    largest = max(largest, step)
                    state["step"] = torch.tensor(step, dtype=torch.int64, device=p.device)
                elif key in STATE_KEYS:
                    state[key] = value.to(device=p.device, dtype=dt, copy=True)
        index = state_dict.get("fusedlr", {}).get("schedule_index", largest)
        device = self._device()
        self._k = None if device is None else torch.tensor(int(index), dtype=torch.int64, device=device)
        self._plan = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if "_step_cache" in self.__dict__:  # not while Optimizer.__init__ adds the first groups
            self._plan = None
            device = self._device()
            if device is not None:
                self._applied_lr_buffer(device)
