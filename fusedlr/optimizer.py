"""``fusedlr.AdamW``: a drop-in ``torch.optim.AdamW`` whose step also unscales (AMP), clips the
global gradient norm and applies an LR schedule, on the device, without a host-device sync."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from . import backends, distributed, fast_step, precision
from .control import FoldedUpdate, GroupHyper, StepControl
from .distributed import ReduceKey
from .history import HistoryRecords, StepHistory
from .plan import STATE_KEYS, Plan, plan_for_step, state_dtype
from .reference import clip_coefficient
from .reference import scheduled_lr as reference_scheduled_lr
from .schedules import Schedule
from .step_hooks import hooked_step

__all__ = ["AdamW"]

# Group flags of torch.optim.AdamW that fusedlr does not take (its step is always fused and capturable).
_TORCH_ONLY_GROUP_KEYS = ("foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")

# GradScaler warns each step that its ``grad_scaler=`` keyword contract will change; fusedlr
# also honours the attribute contract (``grad_scale``/``found_inf``) that replaces it.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)


def _check_lr(lr: object, read_value: bool) -> None:
    """A float, or a 1-element floating tensor (torch's tensor ``lr``); its value is only read when
    ``read_value`` (construction), never in a step, where that would be a host-device sync."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"Tensor lr must be 1-element and float32 or float64, got {lr.dtype} of shape {tuple(lr.shape)}"
            )
        if read_value and not bool(0.0 <= lr < math.inf):
            raise ValueError(f"Invalid learning rate: {lr}")
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr}")


def _check_hyper(lr: object, betas: object, eps: object, weight_decay: object, read_lr: bool = True) -> None:
    _check_lr(lr, read_lr)
    if not isinstance(eps, (int, float)) or not 0.0 <= eps < math.inf:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    if isinstance(betas[0], Tensor):
        raise ValueError("Tensor betas are not supported: pass betas as floats")
    for i, beta in enumerate(betas):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
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
        backend: "auto", "torch" (reference), "triton", "cuda" or "cpu" (compiled extension);
            ``resolved_backend`` names the one that runs.
        history: keep the last ``history`` steps (step, applied LR per group, pre-clip norm, clip
            coefficient, skipped) on the device; ``read_history()`` copies them to the host at once.
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
        (e.g. a group of fp32 params with ``master_weights=False``), implemented by every backend's
        kernels (exact spec: ``fusedlr.precision``).

    States ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq`` are float32 (float64 for float64
    params) whatever the param dtype unless ``state_dtype`` says otherwise; ``step`` is an int64 tensor on the param's device.
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
        history: int | None = None,
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
            lr=lr if isinstance(lr, Tensor) else float(lr),
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
        self.schedule = None if schedule is None else schedule.bind(self.defaults["lr"])
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.backend = backend
        self._grad_norm: Tensor | None = None
        self._k: Tensor | None = None
        self._schedule_table: Tensor | None = None
        # What step() caches (the plan, the backend): a dict, so that step() mutates no attribute
        # (Dynamo before torch 2.13 cannot trace an attribute store on the optimizer).
        self._step_cache: dict[str, Any] = {"plan": None, "impl": None, "impl_device": None}
        self._applied_lr: Tensor | None = None
        self._history: StepHistory | None = None
        self._history_size = history
        # The group LRs the last step saw, and whether the double-schedule warning was given (mutated
        # in place by step(), never reassigned, for the same reason as _step_cache).
        self._lr_watch: dict[str, Any] = {"seen": None, "warned": False}
        device = self._device()
        if device is not None:  # made here, not in the first step, so that step can be traced or captured
            self._schedule_index(device)
            self._schedule_tensor(device)
            self._norm_buffer(device)
            self._applied_lr_buffer(device)
            self._history_buffer(device)
            self._private_buffer("stats", (2,), device)
            self._private_buffer("found_inf", (), device)
        elif history is not None:
            StepHistory(history, 1, torch.device("cpu"))  # validates the argument

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
        """The LR the next update applies to ``param_groups[group]``, as a 0-d float64 device tensor
        (evaluated as the update pass does, from the device schedule table, so a ``DevicePlateau``
        reduction shows)."""
        device = self._device() or torch.device("cpu")
        lr = self.param_groups[group]["lr"]
        if isinstance(lr, Tensor):
            lr = lr.to(device)
        ctrl = StepControl(
            k=self._schedule_index(device),
            schedule=self.schedule,
            schedule_table=self._schedule_tensor(device),
            stats=None,
            max_norm=None,
            inv_scale=None,
            found_inf=None,
        )
        return reference_scheduled_lr(lr, ctrl)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        """Create the missing state of ``p`` for its ``group``: step, moments in the group's state dtype,
        ``max_exp_avg_sq`` with amsgrad, the master of the low-precision mode."""
        state = self.state[p]
        dt = state_dtype(p, group["state_dtype"])
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        precision.init_master(p, state, group["master_weights"])

    def _bucket_precision(
        self, group: dict[str, Any], p: Tensor, states: list[dict[str, Any]], idx: list[int], device: torch.device
    ) -> precision.BucketPrecision | None:
        """The low-precision part of a bucket of params like ``p`` (None in the default mode); ``idx`` are
        the params' indices."""
        master = group["master_weights"]
        default_moments = group["state_dtype"] in (None, state_dtype(p))
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

    def _hyper(self, gi: int, device: torch.device) -> GroupHyper:
        group = self.param_groups[gi]
        lr = group["lr"]
        _check_hyper(lr, group["betas"], group["eps"], group["weight_decay"], read_lr=False)
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
    def _options_fold(self, grad_scaler: Any) -> bool:
        """Whether this step's options let the kernels take its small ops (``fusedlr.control.FoldedUpdate``): no
        step history, and no ``grad_scale`` attribute other than float32 (the kernels read a float32 scale; the
        unfolded step inverts any other). The op path and the fast path both ask it."""
        grad_scale = getattr(self, "grad_scale", None) if grad_scaler is None else None
        return self._history_size is None and (grad_scale is None or grad_scale.dtype == torch.float32)

    def _amp_scale(self, device: torch.device, grad_scaler: Any) -> tuple[Tensor | None, Tensor | None, bool]:
        """(scale, found_inf, check_inf): what AMP asks of this step, with GradScaler's ``scale`` as it is
        (the gradients are divided by it; on its own device).

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
            return scale, None, True
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            found_inf = found_inf.to(device=device, dtype=torch.float32, non_blocking=True)
        return getattr(self, "grad_scale", None), found_inf, False

    def _amp(self, device: torch.device, grad_scaler: Any) -> tuple[Tensor | None, Tensor | None, bool]:
        """(inv_scale, found_inf, check_inf): ``_amp_scale`` with the scale inverted as GradScaler does
        (``_inverse``)."""
        scale, found_inf, check_inf = self._amp_scale(device, grad_scaler)
        return None if scale is None else _inverse(scale, device), found_inf, check_inf

    def _private_buffer(self, key: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """A float32 buffer of ``shape`` of the folded step on ``device`` (cached in ``_step_cache``: private, written
        whole by each step that uses it, never read by the user)."""
        buf = self._step_cache.get(key)
        if buf is None or buf.device != device:
            buf = torch.zeros(shape, dtype=torch.float32, device=device)
            self._step_cache[key] = buf
        return buf

    # ------------------------------------------------------------------ step
    def _step_control(
        self, device: torch.device, stats: Tensor | None, inv_scale: Tensor | None, found_inf: Tensor | None
    ) -> StepControl:
        """The ``StepControl`` of this step on ``device``: the schedule index and table, the clipping bound and the
        given pass-1 stats and AMP inputs."""
        return StepControl(
            k=self._schedule_index(device),
            schedule=self.schedule,
            schedule_table=self._schedule_tensor(device),
            stats=stats,
            max_norm=self.max_grad_norm,
            inv_scale=inv_scale,
            found_inf=found_inf,
        )

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

    @hooked_step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, grad_scaler: Any = None) -> float | None:  # type: ignore[override]
        """One fused update of every parameter that has a gradient.

        Transactional: ``_prepare_step`` does everything that can raise and modifies nothing (a step that
        raises leaves the optimizer as it was); ``_commit_step`` then only runs the update kernels and
        in-place ops, which allocate nothing. ``grad_scaler`` is passed by ``torch.amp.GradScaler.step``;
        do not pass it yourself.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not torch.compiler.is_compiling() and fast_step.step(self, grad_scaler):
            return loss
        prepared = self._prepare_step(grad_scaler)
        if prepared is not None:
            self._commit_step(prepared)
        return loss

    def _prepare_step(self, grad_scaler: Any) -> _PreparedStep | None:
        """Every check, backend and fallback decision, allocation and the reduction pass (into a fresh
        buffer) of one step, without modifying anything; None when no parameter has a gradient."""
        cache = self._step_cache
        plan, grads = plan_for_step(self, cache["plan"])
        cache["plan"] = plan
        if not plan.buckets:
            return None
        self._warn_on_double_schedule()
        device = plan.buckets[0][1].device
        if cache["impl"] is None or cache["impl_device"] != device:
            cache["impl"] = backends.resolve(self.backend, device)
            cache["impl_device"] = device
        impl = cache["impl"]
        applied_lr = self._applied_lr_buffer(device)
        history = self._history_buffer(device)
        bucket_grads = [[grads[i] for i in idx] for _, _, idx, _ in plan.buckets]
        if (
            getattr(impl, "FOLDED", False)
            and self._options_fold(grad_scaler)
            and all(reduce is None and impl.folds(b, gs) for (_, b, _, reduce), gs in zip(plan.buckets, bucket_grads))
        ):
            return self._prepare_folded(impl, plan, bucket_grads, grad_scaler, device)
        work = [
            (self._hyper(gi, device), b, gs, reduce, applied_lr[gi])
            for (gi, b, _, reduce), gs in zip(plan.buckets, bucket_grads)
        ]

        inv_scale, found_inf, check_inf = self._amp(device, grad_scaler)
        stats = None
        if self.max_grad_norm is not None or check_inf:
            stats = self._grad_stats(impl, work, inv_scale, device)
        if check_inf:
            assert stats is not None
            found_inf = (stats[1] > 0).to(torch.float32)

        ctrl = self._step_control(device, stats, inv_scale, found_inf)
        applied: Tensor | int = 1 if found_inf is None else (found_inf <= 0).to(torch.int64)
        updates = []
        for hyper, b, gs, _, lr_out in work:
            upcoming = b.steps + applied  # the backends read this update's step numbers from it
            commit = impl.prepare_update(dataclasses.replace(b, steps=upcoming), gs, hyper, ctrl, lr_out)
            updates.append((b.steps, upcoming, commit))
        skipped = None if found_inf is None else found_inf > 0
        norm = None if stats is None else stats[0].sqrt()
        record = None if history is None else history.prepare_record(ctrl.k, norm, clip_coefficient(ctrl), skipped)
        scaler_found_inf = None
        if check_inf:
            scaler_found_inf = grad_scaler._per_optimizer_states[id(self)]["found_inf_per_device"]
        return _PreparedStep(
            updates, ctrl.k, applied, norm, self._norm_buffer(device), record, applied_lr, scaler_found_inf, found_inf
        )

    def _launch_sets(self, impl: Any, plan: Plan, bucket_grads: list[list[Tensor]]) -> list[list[int]]:
        """The launch sets of a folded step: indices into ``plan.buckets`` of the buckets each update launch takes
        (cached with the plan). A backend that updates several buckets in one launch (``impl.SETS``) takes every
        bucket of one ``impl.launch_key`` (device, dtypes, amsgrad, precision mode) at once, whatever its param
        group; any other backend one bucket per launch."""
        cached = self._step_cache.get("launch_sets")
        if cached is not None and cached[0] is plan and cached[1] is impl:
            return cached[2]
        if getattr(impl, "SETS", False):
            by_key: dict[Any, list[int]] = {}
            for i, ((_, b, _, _), gs) in enumerate(zip(plan.buckets, bucket_grads)):
                by_key.setdefault(impl.launch_key(b, gs), []).append(i)
            sets = list(by_key.values())
        else:
            sets = [[i] for i in range(len(plan.buckets))]
        self._step_cache["launch_sets"] = (plan, impl, sets)
        return sets

    def _prepare_folded(
        self, impl: Any, plan: Plan, bucket_grads: list[list[Tensor]], grad_scaler: Any, device: torch.device
    ) -> _PreparedStep:
        """``_prepare_step`` on a backend that folds the small ops of a step into its kernels (``impl.FOLDED``,
        every bucket run by its kernels, no history): pass 1 of every bucket into the cached private stats
        buffer (``impl.grad_stats_set``: cpu one op, cuda one launch per gradient dtype) and one prepared update
        per launch set (``_launch_sets``), the last of which also advances the schedule index and writes
        ``grad_norm`` and GradScaler's ``found_inf`` (``fusedlr.control.FoldedUpdate``). Nothing else runs on
        the device."""
        hypers = [self._hyper(gi, device) for gi, _, _, _ in plan.buckets]
        buckets = [b for _, b, _, _ in plan.buckets]
        sets = self._launch_sets(impl, plan, bucket_grads)
        scale, found_inf, check_inf = self._amp_scale(device, grad_scaler)
        if scale is not None:
            scale = scale.to(device, non_blocking=True)
        stats = None
        if self.max_grad_norm is not None or check_inf:
            stats = self._private_buffer("stats", (2,), device)
            impl.grad_stats_set(buckets, bucket_grads, stats, scale)
        ctrl = self._step_control(device, stats, None, found_inf)
        found_inf_out = self._private_buffer("found_inf", (), device) if check_inf else None
        applied_lr = self._applied_lr_buffer(device)
        norm_out = self._norm_buffer(device) if stats is not None else None

        def fold(i: int, final: bool) -> FoldedUpdate:  # ``final``: the step's last update writes its outputs
            return FoldedUpdate(
                scale=scale,
                skip_nonfinite=check_inf,
                group=plan.buckets[i][0],
                advance_k=final,
                norm_out=norm_out if final else None,
                found_inf_out=found_inf_out if final else None,
            )

        updates: list[tuple[Tensor | None, Tensor | None, Callable[[], None]]] = []
        for si, members in enumerate(sets):
            folds = [fold(i, si == len(sets) - 1 and i == members[-1]) for i in members]
            if getattr(impl, "SETS", False):
                commit = impl.prepare_update_set(
                    [buckets[i] for i in members],
                    [bucket_grads[i] for i in members],
                    [hypers[i] for i in members],
                    ctrl,
                    applied_lr,
                    folds,
                )
            else:
                (i,) = members
                commit = impl.prepare_update(buckets[i], bucket_grads[i], hypers[i], ctrl, applied_lr, folds[0])
            updates.append((None, None, commit))
        scaler_found_inf = None
        if check_inf:
            scaler_found_inf = grad_scaler._per_optimizer_states[id(self)]["found_inf_per_device"]
        return _PreparedStep(
            updates, ctrl.k, None, None, self._norm_buffer(device), None, applied_lr, scaler_found_inf, found_inf_out
        )

    @staticmethod
    def _commit_step(prepared: _PreparedStep) -> None:
        """Apply a prepared step: the update launches, then the counters, norm, history and schedule index
        (those the launches do not write themselves)."""
        for steps, upcoming, commit in prepared.updates:
            commit()
            if steps is not None:
                steps.copy_(upcoming)
        if prepared.scaler_found_inf is not None:  # GradScaler.update() reads it
            prepared.scaler_found_inf[prepared.norm_out.device] = prepared.found_inf
        if prepared.norm is not None:
            prepared.norm_out.copy_(prepared.norm)
        if prepared.record is not None:
            prepared.record(prepared.applied_lr)
        if prepared.applied is not None:
            prepared.k.add_(prepared.applied)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's format (``step`` as a float64 CPU tensor), plus the schedule index and seed.

        The low-precision modes add their state keys (``master_param``, ``master_remainder``) and
        param group options (``master_weights``, ``stochastic_rounding``, ``state_dtype``), which
        torch.optim.AdamW carries along unused when it loads this state dict. Entries of ``self.state`` that are not a parameter's are kept as they are, as torch does.
        Over meta params, steps and the index stay meta tensors (they hold no value).
        """
        sd = super().state_dict()
        sd["state"] = {i: _saved_steps(s) for i, s in sd["state"].items()}
        k = self._k
        sd["fusedlr"] = {"schedule_index": 0 if k is None else k.clone() if k.is_meta else int(k), "seed": self.seed}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of ``fusedlr.AdamW`` or ``torch.optim.AdamW`` (any of its modes).

        States are kept in float32 (float64 for float64 params, complex for complex params, or the
        group's ``state_dtype``) whatever dtype they were saved in. The low-precision options of the
        param groups stay this optimizer's: a master missing from the state dict starts from the param,
        and a full master and a remainder convert into each other exactly. Without a saved schedule index
        (a torch state dict), the index resumes at the largest per-parameter step, the number of updates
        applied when every parameter trained every step. The saved ``seed`` (stochastic rounding)
        replaces this optimizer's, so that a resumed run draws the same bits. A state dict that does not
        fit (group sizes, moment shapes) raises ValueError and leaves the optimizer unchanged; entries of
        ``state`` that are not a parameter's are kept as is. Load hooks run as torch's: the pre-hooks on a
        shallow copy of ``state_dict`` (what one returns is loaded), the post-hooks once everything is loaded.
        """
        state_dict = state_dict.copy()  # the pre-hooks get a shallow copy, as torch's do
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        for pre_hook in pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved = state_dict["state"]
        params_of = {
            pid: p
            for saved_group, group in zip(state_dict["param_groups"], self.param_groups)
            for pid, p in zip(saved_group["params"], group["params"])
        }
        for pid, s in saved.items():
            if pid in params_of:
                _check_saved_state(pid, params_of[pid], s)
        device = self._device()
        index = state_dict.get("fusedlr", {}).get("schedule_index")
        if isinstance(index, Tensor):  # saved over meta params it holds no value: resume as from torch's
            index = None if index.is_meta else int(index)
        group_of = {
            pid: group
            for saved_group, group in zip(state_dict["param_groups"], self.param_groups)
            for pid in saved_group["params"]
        }
        options = [{key: group[key] for key in precision.GROUP_DEFAULTS} for group in self.param_groups]
        before = (self.state, self.param_groups, self._k, self._plan, self.seed)
        try:  # torch's load without its hooks: this one runs the pre-hooks above, the post-hooks below
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
            super().load_state_dict(state_dict)
            for group, kept in zip(self.param_groups, options):
                group.update(kept)
            self._adopt_torch_groups()
            largest = 0
            for pid, s in saved.items():
                p = params_of.get(pid)
                if p is None:
                    continue
                state = self.state[p]
                for key, value in s.items():
                    if key == "step":
                        step = int(value) if not isinstance(value, Tensor) else int(value.item())
                        largest = max(largest, step)
                        state["step"] = torch.tensor(step, dtype=torch.int64, device=p.device)
                    elif key in STATE_KEYS:
                        dt = state_dtype(p, group_of[pid]["state_dtype"])
                        state[key] = value.to(device=p.device, dtype=dt, copy=True)
                    elif key == "master_param":
                        state[key] = value.to(device=p.device, dtype=torch.float32, copy=True)
                    elif key == "master_remainder":
                        state[key] = value.to(device=p.device, dtype=torch.int16, copy=True)
            self.seed = int(state_dict.get("fusedlr", {}).get("seed", self.seed))
            if device is None:
                self._k = None
            else:
                self._k = torch.tensor(largest if index is None else index, dtype=torch.int64, device=device)
        except BaseException:
            self.state, self.param_groups, self._k, self._plan, self.seed = before
            raise
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre_hooks, post_hooks
        self._plan = None
        for post_hook in post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        """Every attribute (schedule, max_grad_norm, backend, schedule index, ... and any added later) but
        the step cache (rebuilt on demand) and what torch's own ``__getstate__`` does not keep either: its
        hooks, and what an LR scheduler puts on the instance (a ``step`` wrapper that calls the original
        optimizer through a weak reference, and ``_opt_called``; any instance attribute shadowing a method)."""
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("_step_cache", "_opt_called")
            and not k.startswith("_optimizer_")
            and not callable(getattr(type(self), k, None))
        }
    def _adopt_torch_groups(self) -> None:
        """After loading a torch state dict: drop torch-only group flags (``fused: True`` would be a lie
        here) and, with a schedule, take ``initial_lr`` (an LR scheduler's peak) as the peak ``lr``."""
        for group in self.param_groups:
            for key in _TORCH_ONLY_GROUP_KEYS:
                if key not in self.defaults:
                    group.pop(key, None)
            if self.schedule is not None and "initial_lr" in group:
                group["lr"] = group["initial_lr"]
        self._lr_watch["seen"] = None

    # ------------------------------------------------------------------ logging
    def _applied_lr_buffer(self, device: torch.device) -> Tensor:
        """``_applied_lr``: float64 ``[len(param_groups)]`` on ``device``, NaN for a group not yet updated."""
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
        buffer updated in place (so it also updates under torch.compile and CUDA-graph replay; ``.clone()``
        it to keep a value), unchanged by a step that GradScaler skips, NaN before the group's first
        applied update."""
        return self._applied_lr_buffer(self._device() or torch.device("cpu"))[group]

    def _history_buffer(self, device: torch.device) -> StepHistory | None:
        if self._history_size is None:
            return None
        history = self._history
        if history is None:
            history = StepHistory(self._history_size, len(self.param_groups), device)
        else:
            history = history.to(device, len(self.param_groups))
        if history is not self._history:  # assigned only when it changed (see _step_cache)
            self._history = history
        return history

    @property
    def history_size(self) -> int | None:
        """The ``history=`` this optimizer was built with: steps kept on the device, or None."""
        return self._history_size

    def read_history(self) -> HistoryRecords:
        """The last ``history`` steps, oldest first, with one device-to-host copy (see ``StepHistory``)."""
        if self._history_size is None:
            raise RuntimeError("read_history() needs fusedlr.AdamW(..., history=N), the number of steps to keep")
        device = self._device() or torch.device("cpu")
        history = self._history_buffer(device)
        assert history is not None
        return history.read()

    def _warn_on_double_schedule(self) -> None:
        """Warn once when something else (an LR scheduler) changes ``lr`` while ``schedule`` applies too."""
        watch = self._lr_watch
        if self.schedule is None or watch["warned"]:
            return
        lrs = [g["lr"] for g in self.param_groups]
        seen = watch["seen"]
        watch["seen"] = lrs
        for i, group in enumerate(self.param_groups):
            before = group.get("initial_lr", group["lr"]) if seen is None or i >= len(seen) else seen[i]
            lr = group["lr"]
            # a tensor LR is compared by identity: reading its value would be an op (a sync on CUDA) every step
            if (lr is not before) if isinstance(lr, Tensor) or isinstance(before, Tensor) else lr != before:
                watch["warned"] = True
                warnings.warn(
                    f"fusedlr.AdamW(schedule=...) applies param_groups[i]['lr'] * schedule(k), but param_groups[{i}]"
                    f"['lr'] changed from {before} to {group['lr']}: an LR scheduler drives it too, so the schedule is "
                    "applied twice. Keep one: drop the LR scheduler (with Hugging Face Trainer pass "
                    "fusedlr.integrations.constant_scheduler(opt)), convert it (schedule=fusedlr.from_torch_scheduler"
                    "(scheduler)), or pass schedule=None",
                    UserWarning,
                    stacklevel=3,
                )
                return

    @property
    def resolved_backend(self) -> str:
        """The backend that runs the steps (``backend`` resolved on the parameters' device)."""
        device = self._step_cache["impl_device"] or self._device() or torch.device("cpu")
        return backends.resolve(self.backend, device).NAME

    def __repr__(self) -> str:
        extra = (
            f"schedule: {'None' if self.schedule is None else _describe(self.schedule)}\n"
            f"max_grad_norm: {self.max_grad_norm}\n"
            f"backend: {self.backend} (runs: {self.resolved_backend})\n"
        )
        text = super().__repr__()
        return text[: -1] + extra + ")"

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._step_cache = {"plan": None, "impl": None, "impl_device": None}
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            for key, default in precision.GROUP_DEFAULTS.items():
                group.setdefault(key, default)
        self.__dict__.setdefault("seed", 0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, and a parameter listed twice in the group is refused (torch only warns, then
        updates it twice per step)."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else params
        if not isinstance(params, set):  # torch refuses sets itself
            params = list(params)
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # (name, param) pairs too
            if len({id(p) for p in tensors}) != len(tensors):
                raise ValueError(
                    "a parameter group lists a parameter more than once; list each parameter once "
                    "(deduplicate, e.g. with dict.fromkeys(params))"
                )
            param_group = {**param_group, "params": params}
        options = [param_group.get(key, self.defaults[key]) for key in precision.GROUP_DEFAULTS]
        precision.check_options(*options, f"param group {len(self.param_groups)}: ")
        super().add_param_group(param_group)
        if "_step_cache" in self.__dict__:  # not while Optimizer.__init__ adds the first groups
            self._plan = None
            device = self._device()
            if device is not None:
                self._applied_lr_buffer(device)


@dataclass
class _PreparedStep:
    """What ``AdamW._commit_step`` applies: per bucket (its step counters, their values after this
    update, the backend's commit; counters None when the commit advances them), then the step-level outputs,
    all computed or allocated beforehand."""

    updates: list[tuple[Tensor | None, Tensor | None, Callable[[], None]]]
    k: Tensor  # the schedule index, advanced by ``applied`` (1, or 0/1 as a device tensor under AMP)
    applied: Tensor | int | None  # None: the update launches advance k themselves
    norm: Tensor | None  # this step's pre-clip norm, copied into ``norm_out`` (the ``grad_norm`` buffer)
    norm_out: Tensor
    record: Callable[[Tensor], None] | None  # the history row's commit, given the applied LRs
    applied_lr: Tensor
    scaler_found_inf: dict[torch.device, Tensor] | None  # GradScaler's found_inf_per_device, when it asked
    found_inf: Tensor | None


def _saved_steps(state: Any) -> Any:
    """A parameter's state as saved: ``step`` as a float64 CPU tensor (as torch saves it); others as is."""
    if not isinstance(state, dict) or not isinstance(state.get("step"), Tensor):
        return state
    step = state["step"]
    return {**state, "step": step.to(torch.float64) if step.is_meta else step.to("cpu", torch.float64)}


def _check_saved_state(pid: object, p: Tensor, state: Any) -> None:
    """Refuse, before loading anything, a saved state that cannot be parameter ``pid``'s."""
    if not isinstance(state, dict):
        raise ValueError(f"loaded state of parameter {pid} is a {type(state).__name__}, not a dict")
    for key in STATE_KEYS:
        t = state.get(key)
        if key not in state:
            continue
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
            raise ValueError(
                f"loaded state '{key}' of parameter {pid} must be a floating-point tensor, got {type(t).__name__}"
                + (f" of {t.dtype}" if isinstance(t, Tensor) else "")
            )
        if distributed.is_dtensor(t) != distributed.is_dtensor(p) or distributed.local(t).shape != distributed.local(
            p
        ).shape:
            raise ValueError(
                f"loaded state '{key}' of parameter {pid} has shape {tuple(distributed.local(t).shape)}, its parameter "
                f"{tuple(distributed.local(p).shape)}: the checkpoint belongs to another model (or another sharding: "
                "load sharded state with torch.distributed.checkpoint)"
            )
        if t.is_complex() != p.is_complex():
            raise ValueError(f"loaded state '{key}' of parameter {pid} is {t.dtype}, its parameter {p.dtype}")
    step = state.get("step")
    if step is not None and isinstance(step, Tensor) and step.numel() != 1:
        raise ValueError(f"loaded state 'step' of parameter {pid} must be a number, got shape {tuple(step.shape)}")
def _describe(schedule: Schedule) -> str:
    params = ", ".join(f"{p:g}" for p in schedule.params[:8])
    more = ", ..." if len(schedule.params) > 8 else ""
    return f"{schedule.name}({params}{more})"
