"""What every backend's update pass reads besides the tensors: the per-step control block.

All fields are device tensors or plain Python constants, so a step reads them without
a host-device sync and a CUDA graph can replay it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .schedules import Schedule

__all__ = ["StepControl", "GroupHyper", "FoldedUpdate", "CLIP_EPS"]

#: Added to the global norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` does.
CLIP_EPS = 1e-6


@dataclass(frozen=True)
class GroupHyper:
    """One param group's AdamW hyperparameters (plain floats, fixed for the launch).

    ``lr`` is the peak LR when a schedule is set (applied LR: ``lr * sched(k)``), else the LR itself;
    a 0-d float32/float64 tensor on the device is read there by the kernels (so filling it in place
    changes the LR of the next update, also under CUDA-graph replay).
    """

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool


@dataclass(frozen=True)
class StepControl:
    """Device-side inputs of the update pass, shared by every bucket of a step.

    k: int64 0-d tensor, updates applied before this one (the schedule index; first update k=0).
    schedule: the LR schedule (host object, constant for the optimizer's life), or None for a constant LR.
    schedule_table: ``schedule.as_tensor()`` on the device (float64 ``[kind, *params]``), what kernels read.
    stats: float32 tensor ``[2]`` from the reduction pass: ``[sum of squares of unscaled grads,
        non-finite flag]``; None when the reduction did not run.
    max_norm: clip the global norm ``sqrt(stats[0])`` to this (``clip_grad_norm_``'s coefficient), or None.
    inv_scale: float32 0-d tensor multiplying every gradient (AMP unscale), or None.
    found_inf: float32 0-d tensor; when > 0 the update is skipped entirely. None: never skip.
    """

    k: Tensor
    schedule: Schedule | None
    schedule_table: Tensor | None
    stats: Tensor | None
    max_norm: float | None
    inv_scale: Tensor | None
    found_inf: Tensor | None


@dataclass(frozen=True)
class FoldedUpdate:
    """What the update of a folding backend (``FOLDED = True``: ``cpu``, ``cuda``, ``triton``) does beyond
    ``StepControl``: the small ops of a step, folded into its kernels, so that a step is one ``grad_stats`` and one
    ``adamw_update`` per bucket and nothing else.

    With it, ``bucket.steps`` hold the updates applied before this one (this update's step numbers are
    ``steps + 1``) and the update advances them by 1 when it is applied; ``applied_lr`` is the optimizer's
    whole float64 ``[groups]`` buffer.

    scale: GradScaler's scale (float32 0-d), or None: gradients are multiplied by ``1 / scale`` computed as
        GradScaler does (float64, rounded to float32); ``StepControl.inv_scale`` is then None.
    skip_nonfinite: skip the update also when ``stats[1] > 0`` (GradScaler's inf check, from pass 1).
    group: this bucket's entry of ``applied_lr``.
    advance_k: advance ``StepControl.k`` by 1 when the update is applied (the step's last update).
    norm_out: receives ``sqrt(stats[0])`` (float32 0-d), also when the update is skipped, or None.
    found_inf_out: receives 1.0 when the update is skipped, else 0.0 (float32 0-d), or None.
    """

    scale: Tensor | None
    skip_nonfinite: bool
    group: int
    advance_k: bool
    norm_out: Tensor | None
    found_inf_out: Tensor | None
