"""The LR range test ("LR finder"): train briefly with an exponentially growing LR and pick the LR
where the loss falls fastest, then put everything back as it was.

Update ``i`` (0-based) uses ``start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))``, applied on the
device by a ``fusedlr.AdamW`` whose schedule is that exponential ramp. The loss is smoothed with an
exponential moving average (bias-corrected); the test stops early when the smoothed loss exceeds
``diverge_factor`` times its best value or the loss is not finite.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from .optimizer import AdamW
from .schedules import get_schedule

__all__ = ["lr_find", "LRFindResult"]


@dataclass(frozen=True)
class LRFindResult:
    """lrs[i]: the LR update i applied; losses[i]: the loss of the batch before it (raw);
    smoothed[i]: their bias-corrected moving average; suggested_lr: where the smoothed loss falls
    fastest against log(lr) (None with fewer than 3 points); diverged: whether the test stopped early."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float | None
    diverged: bool

    def plot(self, path: str) -> None:
        """Draw the smoothed loss against the LR (log scale), the suggestion marked, to ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(self.lrs, self.losses, alpha=0.3, label="loss")
        ax.plot(self.lrs, self.smoothed, label="smoothed loss")
        if self.suggested_lr is not None:
            ax.axvline(self.suggested_lr, color="red", linestyle="--", label=f"suggested lr {self.suggested_lr:.2e}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (applied by the update)")
        ax.set_ylabel("training loss")
        ax.set_title(f"LR range test: {len(self.lrs)} updates, lr {self.lrs[0]:.1e} .. {self.lrs[-1]:.1e}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _suggest(lrs: list[float], smoothed: list[float]) -> float | None:
    """The LR of the steepest descent of the smoothed loss against log(lr): central differences over
    ``h = max(1, n // 20)`` points each side (so batch-to-batch noise does not win), skipping the
    first tenth of the points, where the moving average has little history."""
    skip = len(lrs) // 10
    lrs, smoothed = lrs[skip:], smoothed[skip:]
    h = max(1, len(lrs) // 20)
    if len(lrs) < 2 * h + 1:
        return None
    x = torch.tensor(lrs, dtype=torch.float64).log()
    y = torch.tensor(smoothed, dtype=torch.float64)
    slope = (y[2 * h :] - y[: -2 * h]) / (x[2 * h :] - x[: -2 * h])
    return lrs[h + int(torch.argmin(slope))]


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("lr_find: batches is empty; pass an iterable of batches (a DataLoader, a list)")


def lr_find(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], Tensor],
    batches: Iterable[Any],
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    weight_decay: float = 0.0,
    smooth: float = 0.98,
    diverge_factor: float = 4.0,
    backend: str = "auto",
) -> LRFindResult:
    """Run the LR range test on ``model``; ``loss_fn(model, batch)`` returns a scalar loss tensor and
    ``batches`` is iterated (again when exhausted) for ``num_iter`` updates at most.

    The updates use ``fusedlr.AdamW`` with the param groups, betas, eps and weight decay of
    ``optimizer`` when one is given (else one group with ``weight_decay``). Afterwards the model's
    parameters, buffers, gradients and train/eval mode, and ``optimizer``'s state, are restored exactly.
    """
    if not (0.0 < start_lr < end_lr < math.inf):
        raise ValueError(f"need 0 < start_lr < end_lr, got start_lr={start_lr!r}, end_lr={end_lr!r}")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 2:
        raise ValueError(f"num_iter must be an int >= 2, got {num_iter!r}")
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth!r}")
    if not diverge_factor > 1.0:
        raise ValueError(f"diverge_factor must be > 1, got {diverge_factor!r}")
    tensors = list(model.state_dict(keep_vars=True).values())
    saved = [t.detach().clone() for t in tensors]
    params = [p for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    was_training = model.training
    opt_state = None if optimizer is None else copy.deepcopy(optimizer.state_dict())
    if optimizer is None:
        groups: list[dict[str, Any]] = [{"params": [p for p in params if p.requires_grad], "weight_decay": weight_decay}]
    else:
        keys = ("betas", "eps", "weight_decay")
        groups = [{"params": g["params"], **{k: g[k] for k in keys if k in g}} for g in optimizer.param_groups]
    ramp = get_schedule("exponential", gamma=(end_lr / start_lr) ** (1.0 / (num_iter - 1)))
    finder = AdamW(groups, lr=start_lr, schedule=ramp, backend=backend)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    diverged = False
    avg, best = 0.0, math.inf
    model.train()
    try:
        for i, batch in zip(range(num_iter), _cycle(batches)):
            loss = loss_fn(model, batch)
            finder.zero_grad(set_to_none=True)
            loss.backward()
            finder.step()
            value = float(loss.detach())
            lrs.append(float(finder.applied_lr()))
            losses.append(value)
            avg = smooth * avg + (1.0 - smooth) * value
            smoothed.append(avg / (1.0 - smooth ** (i + 1)))
            best = min(best, smoothed[-1])
            if not math.isfinite(value) or smoothed[-1] > diverge_factor * best:
                diverged = True
                break
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
        for p, g in zip(params, grads):
            p.grad = g
        model.train(was_training)
        if optimizer is not None:
            optimizer.load_state_dict(opt_state)
    end = len(lrs) - 1 if diverged else len(lrs)  # the diverged point is not a candidate
    return LRFindResult(lrs, losses, smoothed, _suggest(lrs[:end], smoothed[:end]), diverged)
