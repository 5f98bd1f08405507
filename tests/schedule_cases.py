"""Schedules of the kinds that torch's schedulers need, for the backend tests (C++ kernel, Triton)."""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler as L

import fusedlr
from fusedlr.schedules import Kind, product, sequential

__all__ = ["torch_kind_schedules"]


def torch_kind_schedules() -> list[fusedlr.Schedule]:
    """One or more schedules of each kind ``from_torch_scheduler`` added, composites included."""

    def opt() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    gs = fusedlr.get_schedule
    convert = fusedlr.from_torch_scheduler
    return [
        convert(L.CosineAnnealingLR(opt(), T_max=37, eta_min=0.001)),
        convert(L.CosineAnnealingWarmRestarts(opt(), T_0=7, T_mult=2, eta_min=0.002)),
        convert(L.CosineAnnealingWarmRestarts(opt(), T_0=3, T_mult=3)),
        convert(L.CosineAnnealingWarmRestarts(opt(), T_0=5)),
        convert(L.LinearLR(opt(), start_factor=0.1, end_factor=0.9, total_iters=20)),
        convert(L.ConstantLR(opt(), factor=0.3, total_iters=20)),
        convert(L.PolynomialLR(opt(), total_iters=50, power=2.0)),
        convert(L.CyclicLR(opt(), 0.01, 0.1, step_size_up=10, step_size_down=7, mode="triangular2", cycle_momentum=False)),
        convert(L.CyclicLR(opt(), 0.01, 0.1, step_size_up=10, mode="exp_range", gamma=0.99, cycle_momentum=False)),
        fusedlr.Schedule("factor", Kind.FACTOR, (0.25,)),
        sequential([gs("linear", 3, 10), gs("multistep", milestones=[3, 9], gamma=0.5),
                    gs("onecycle", num_training_steps=40, three_phase=True)], [10, 30]),
        product([gs("exponential", gamma=0.97), fusedlr.Schedule("f", Kind.FACTOR, (0.5,)), gs("step", step_size=4)]),
    ]
