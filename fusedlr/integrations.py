"""Hugging Face Trainer glue: a constant LR scheduler for the fused recipe and a logging callback.

The fused recipe: ``fusedlr.AdamW(..., schedule=..., max_grad_norm=...)`` owns the schedule and the
clipping, so Trainer gets ``constant_scheduler(opt)`` and ``TrainingArguments(max_grad_norm=0)``;
``FusedLRCallback(opt)`` then replaces Trainer's logged ``learning_rate`` (the peak) with the LR the
last update applied and adds the pre-clip ``grad_norm`` (and, with ``history=``, the clip
coefficient and the number of skipped steps since the previous log).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .optimizer import AdamW

__all__ = ["constant_scheduler", "FusedLRCallback"]


def _one(k: int) -> float:
    return 1.0


def constant_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """An LR scheduler that never changes ``lr`` (for Trainer, whose own would apply a second schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, _one)


try:
    from transformers import TrainerCallback
except ImportError:  # transformers is optional
    TrainerCallback = object  # type: ignore[assignment,misc]


class FusedLRCallback(TrainerCallback):  # type: ignore[misc,valid-type]
    """Log what fusedlr applied: ``learning_rate`` (``opt.applied_lr()``), ``grad_norm`` (pre-clip)
    and, when the optimizer keeps a history, ``clip_coef`` (last step) and ``skipped_steps``.

    Values are read at logging time only (Trainer syncs there anyway). Trainer hands ``logs`` to the
    callbacks in order: pass this callback before reporting ones, e.g.
    ``trainer.callback_handler.callbacks.insert(0, FusedLRCallback(opt))``; ``state.log_history`` is
    updated too.
    """

    def __init__(self, opt: AdamW) -> None:
        self.opt = opt
        self._last_step = -1

    def values(self) -> dict[str, float]:
        """The entries this callback logs, read from the optimizer now."""
        out = {"learning_rate": float(self.opt.applied_lr())}
        norm = self.opt.grad_norm
        if norm is not None and not math.isnan(float(norm)):
            out["grad_norm"] = float(norm)
        if self.opt.history_size is not None:
            records = self.opt.read_history()
            fresh = [i for i, s in enumerate(records.step) if s > self._last_step]
            if records.step:
                out["clip_coef"] = records.clip_coef[-1]
                self._last_step = records.step[-1]
            out["skipped_steps"] = float(sum(records.skipped[i] for i in fresh))
        return out

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:
            return
        values = self.values()
        logs.update(values)
        if state.log_history:
            state.log_history[-1].update(values)
