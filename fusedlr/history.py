"""A device-side ring buffer of the last N optimizer steps, for logging without a host-device sync.

Each ``AdamW.step()`` writes one row with a few device ops (no sync, CUDA-graph capturable: the
write position is a device tensor); ``read()`` copies the buffer to the host once. Read it every
``capacity`` steps (or less) to see every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StepHistory", "HistoryRecords"]


@dataclass(frozen=True)
class HistoryRecords:
    """The recorded steps, oldest first, as host lists.

    step: 0-based number of the ``step()`` call (skipped steps included).
    schedule_index: ``k`` of the update (updates applied before it; unchanged by a skipped step).
    lr: per record, the LR each param group's update used (the last applied one on a skipped step).
    grad_norm: global pre-clip gradient norm (NaN when the step ran no reduction pass).
    clip_coef: the clip coefficient ``min(1, max_norm / (norm + 1e-6))`` applied (1.0 without clipping).
    skipped: whether GradScaler found inf/NaN and the step changed nothing.
    """

    step: list[int]
    schedule_index: list[int]
    lr: list[list[float]]
    grad_norm: list[float]
    clip_coef: list[float]
    skipped: list[bool]

    def __len__(self) -> int:
        return len(self.step)


class StepHistory:
    """The last ``capacity`` steps of an optimizer with ``num_groups`` param groups, on ``device``.

    Row layout (float64): ``[step, k, norm, clip_coef, skipped, lr_0 .. lr_{G-1}]``.
    """

    _FIXED = 5

    def __init__(self, capacity: int, num_groups: int, device: torch.device) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"history must be a positive int (the number of steps kept), got {capacity!r}")
        self.capacity = capacity
        self.rows = torch.full((capacity, self._FIXED + num_groups), float("nan"), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # step() calls recorded so far

    def to(self, device: torch.device, num_groups: int) -> "StepHistory":
        """This history on ``device`` with ``num_groups`` lr columns (new groups start as NaN)."""
        if self.rows.device == device and self.rows.shape[1] == self._FIXED + num_groups:
            return self
        moved = StepHistory(self.capacity, num_groups, device)
        keep = min(self.rows.shape[1], moved.rows.shape[1])
        moved.rows[:, :keep].copy_(self.rows[:, :keep])
        moved.count.copy_(self.count)
        return moved

    def record(self, k: Tensor, lrs: Tensor, norm: Tensor | None, coef: Tensor | None, skipped: Tensor | None) -> None:
        """Write one step's row at ``count % capacity`` and advance ``count`` (device ops only)."""
        self.prepare_record(k, norm, coef, skipped)(lrs)

    def prepare_record(
        self, k: Tensor, norm: Tensor | None, coef: Tensor | None, skipped: Tensor | None
    ) -> Callable[[Tensor], None]:
        """``record`` in two phases: the row is built now (this allocates); the returned commit takes the
        groups' applied LRs (float64 ``[G]``), writes the row and advances ``count``, allocating nothing."""
        device = self.rows.device
        nan = torch.full((), float("nan"), dtype=torch.float64, device=device)
        one = torch.ones((), dtype=torch.float64, device=device)
        fixed = [
            self.count.to(torch.float64),
            k.to(torch.float64),
            nan if norm is None else norm.to(torch.float64),
            one if coef is None else coef.to(torch.float64),
            torch.zeros_like(one) if skipped is None else skipped.to(torch.float64),
        ]
        lrs_out = torch.empty(self.rows.shape[1] - self._FIXED, dtype=torch.float64, device=device)
        row = torch.cat([torch.stack(fixed), lrs_out]).reshape(1, -1)
        slot = torch.remainder(self.count, self.capacity).reshape(1)

        def commit(lrs: Tensor) -> None:
            row[0, self._FIXED :].copy_(lrs)
            self.rows.index_copy_(0, slot, row)
            self.count.add_(1)

        return commit

    def read(self) -> HistoryRecords:
        """The recorded steps (at most ``capacity``, oldest first), with one device-to-host copy."""
        host = torch.cat([self.rows.reshape(-1), self.count.to(torch.float64).reshape(1)]).cpu()
        count = int(host[-1])
        rows = host[:-1].reshape(self.rows.shape)
        n = min(count, self.capacity)
        order = [(count - n + i) % self.capacity for i in range(n)]
        rows = rows[order].tolist()
        f = self._FIXED
        return HistoryRecords(
            step=[int(r[0]) for r in rows],
            schedule_index=[int(r[1]) for r in rows],
            lr=[r[f:] for r in rows],
            grad_norm=[r[2] for r in rows],
            clip_coef=[r[3] for r in rows],
            skipped=[bool(r[4]) for r in rows],
        )
