"""Mutation check: plant known bugs in the reference backend (the spec every backend is tested against)
and assert that the property-based parity test catches each of them.

Each mutant is applied with ``monkeypatch`` and undone afterwards; the parity property
(``test_parity_property.check_case`` over ``test_parity_property.cases``, the same derandomized examples
as the suite's own run) must then fail with an assertion, not pass and not crash on something else.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import Phase, given, settings

import fusedlr
from fusedlr import reference

sys.path.insert(0, str(Path(__file__).parent))
import test_parity_property as parity  # noqa: E402

pytestmark = parity.pytestmark


def _bias_correction_off_by_one(mp: pytest.MonkeyPatch) -> None:
    """Bias corrections computed with step t + 1 instead of t."""
    original = reference.prepare_update

    def mutant(bucket, grads, hyper, ctrl, applied_lr=None):
        bucket.steps.add_(1)
        commit = original(bucket, grads, hyper, ctrl, applied_lr)
        bucket.steps.sub_(1)
        return commit

    mp.setattr(reference, "prepare_update", mutant)


def _amsgrad_max_dropped(mp: pytest.MonkeyPatch) -> None:
    """amsgrad ignored: the running maximum is neither updated nor used."""
    original = reference.prepare_update

    def mutant(bucket, grads, hyper, ctrl, applied_lr=None):
        return original(dataclasses.replace(bucket, max_exp_avg_sqs=None), grads, hyper, ctrl, applied_lr)

    mp.setattr(reference, "prepare_update", mutant)


def _clip_epsilon_changed(mp: pytest.MonkeyPatch) -> None:
    """clip_grad_norm_'s 1e-6 in max_norm / (norm + 1e-6) replaced by 1e-3."""
    mp.setattr(reference, "CLIP_EPS", 1e-3)


def _skipped_step_advances_schedule(mp: pytest.MonkeyPatch) -> None:
    """A step skipped by GradScaler (inf/NaN gradient) still advances the schedule index."""
    original = fusedlr.AdamW.step

    def mutant(self, *args, **kwargs):
        before = self.schedule_index.clone()
        loss = original(self, *args, **kwargs)
        if torch.equal(before, self.schedule_index):
            self.schedule_index.add_(1)
        return loss

    mp.setattr(fusedlr.AdamW, "step", mutant)


MUTANTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "bias correction off by one": _bias_correction_off_by_one,
    "amsgrad max dropped": _amsgrad_max_dropped,
    "clip epsilon changed": _clip_epsilon_changed,
    "skipped step advances the schedule": _skipped_step_advances_schedule,
}


@settings(parity.PROPERTY, max_examples=parity.EXAMPLES, phases=[Phase.generate])  # no shrinking: a failure is enough
@given(case=parity.cases())
def _parity_on_reference(case: parity.Case) -> None:
    parity.check_case("torch", case)


def _assertions_only(err: BaseException) -> bool:
    if isinstance(getattr(err, "exceptions", None), tuple):  # an exception group: several distinct failures
        return all(_assertions_only(e) for e in err.exceptions)
    return isinstance(err, AssertionError)


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_parity_suite_catches_the_mutant(mutant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    MUTANTS[mutant](monkeypatch)
    with pytest.raises(BaseException) as caught:
        _parity_on_reference()
    assert _assertions_only(caught.value), f"the mutant broke the harness, not a parity check: {caught.value!r}"
