"""Counting the steps that ``fusedlr.fast_step`` takes, for the fast-path tests (tests/test_fast_step*.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from fusedlr import fast_step

__all__ = ["fast_steps"]


@contextmanager
def fast_steps(enabled: bool) -> Iterator[list[int]]:
    """Within it, ``fusedlr.fast_step.step`` runs when ``enabled`` (else every step takes the op path); yields a
    one-element list: the number of steps the fast path took."""
    taken = [0]
    real = fast_step.step

    def counted(opt: object, grad_scaler: object) -> bool:
        ran = real(opt, grad_scaler) if enabled else False
        taken[0] += ran
        return ran

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast_step, "step", counted)
        yield taken
