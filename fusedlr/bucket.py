"""A bucket: the tensors one kernel launch updates (one param group, one device, one dtype pair)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .precision import BucketPrecision

__all__ = ["Bucket"]


@dataclass
class Bucket:
    """Parameters of one param group sharing a device, a param dtype and a grad dtype, with their state.

    ``steps`` is an int64 tensor ``[n]`` on the device; ``state['step']`` of parameter ``i`` is the
    view ``steps[i]`` so that one op advances every counter. Before the update pass it holds the
    step number of this update (1 for a parameter's first update), except for a folded update
    (``fusedlr.control.FoldedUpdate``), which reads the updates applied before and advances them itself.
    ``cache`` belongs to the backend (pointer tables and the like); it dies with the bucket, which
    is rebuilt whenever the set of parameters with gradients changes or state is loaded.
    ``precision`` holds the master weights and rounding of the low-precision modes (``fusedlr.precision``);
    None for the default mode.
    """

    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor] | None
    steps: Tensor
    precision: BucketPrecision | None = None
    cache: dict[str, object] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.steps.device
