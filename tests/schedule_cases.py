"""Schedules of the kinds that torch's schedulers need, for the backend tests (C++ kernel, Triton)."""

from __future__ import annotations

import fusedlr
from fusedlr.schedules import Kind, product, sequential

__all__ = ["torch_kind_schedules"]


def torch_kind_schedules() -> list[fusedlr.Schedule]:
    """One or more schedules of each kind ``from_torch_scheduler`` adds, composites included, built
    from their encodings (tests/test_torch_schedulers.py checks the conversion itself; constructing
    torch schedulers here, at collection time, upset the Triton interpreter after torch.compile)."""
    gs = fusedlr.get_schedule
    return [
        fusedlr.Schedule("CosineAnnealingLR", Kind.COSINE_ANNEALING, (37.0, 0.01)),
        fusedlr.Schedule("CosineAnnealingWarmRestarts", Kind.COSINE_WARM_RESTARTS, (7.0, 2.0, 0.02)),
        fusedlr.Schedule("CosineAnnealingWarmRestarts", Kind.COSINE_WARM_RESTARTS, (3.0, 3.0, 0.0)),
        fusedlr.Schedule("CosineAnnealingWarmRestarts", Kind.COSINE_WARM_RESTARTS, (5.0, 1.0, 0.0)),
        fusedlr.Schedule("LinearLR", Kind.LINEAR_FACTOR, (0.1, 0.9, 20.0)),
        fusedlr.Schedule("ConstantLR", Kind.CONSTANT_FACTOR, (0.3, 20.0)),
        fusedlr.Schedule("PolynomialLR", Kind.POLYNOMIAL_DECAY, (50.0, 2.0)),
        fusedlr.Schedule("CyclicLR", Kind.CYCLIC, (1.0, 10.0, 10.0, 17.0, 1.0, 1.0)),
        fusedlr.Schedule("CyclicLR", Kind.CYCLIC, (1.0, 10.0, 10.0, 20.0, 2.0, 0.99)),
        fusedlr.Schedule("factor", Kind.FACTOR, (0.25,)),
        sequential([gs("linear", 3, 10), gs("multistep", milestones=[3, 9], gamma=0.5),
                    gs("onecycle", num_training_steps=40, three_phase=True)], [10, 30]),
        product([gs("exponential", gamma=0.97), fusedlr.Schedule("f", Kind.FACTOR, (0.5,)), gs("step", step_size=4)]),
    ]
