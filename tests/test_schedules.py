"""Every schedule against an independent implementation: Hugging Face's get_scheduler and torch's LR schedulers."""

from __future__ import annotations

import math

import pytest
import torch

import fusedlr
from fusedlr.schedules import SCHEDULE_NAMES

transformers = pytest.importorskip("transformers")

PEAK = 0.1
W, T = 7, 53
STEPS = range(0, T + 12)

HF_CASES = [
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("linear", {}),
    ("cosine", {}),
    ("cosine", {"num_cycles": 1.5}),
    ("cosine_with_restarts", {}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {"lr_end": 1e-4, "power": 2.0}),
    ("polynomial", {}),
    ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 20}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 0.01}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.05}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.05, "warmup_lr_rate": 0.2}),
    ("warmup_stable_decay", {"num_decay_steps": 20}),
    ("warmup_stable_decay", {"num_decay_steps": 15, "warmup_type": "cosine", "decay_type": "1-sqrt", "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 15, "warmup_type": "1-sqrt", "decay_type": "linear"}),
    ("warmup_stable_decay", {"num_decay_steps": 10, "num_stable_steps": 5, "decay_type": "cosine", "num_cycles": 0.7}),
]

NEEDS_LR_INIT = {"polynomial", "cosine_with_min_lr", "cosine_warmup_with_min_lr"}


def _lambda_lr_values(sched: torch.optim.lr_scheduler.LRScheduler, opt: torch.optim.Optimizer, n: int) -> list[float]:
    """The LR each of n optimizer steps uses, read off the group as a training loop would."""
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)


@pytest.mark.parametrize("name,kwargs", HF_CASES, ids=lambda x: str(x))
def test_matches_hugging_face(name: str, kwargs: dict) -> None:
    opt = _opt()
    hf = transformers.get_scheduler(
        name, opt, num_warmup_steps=W, num_training_steps=T, scheduler_specific_kwargs=dict(kwargs)
    )
    expected = _lambda_lr_values(hf, opt, len(STEPS))
    ours_kwargs = dict(kwargs)
    if name in NEEDS_LR_INIT and ("lr_end" in kwargs or "min_lr" in kwargs or name == "polynomial"):
        ours_kwargs["lr_init"] = PEAK
    sched = fusedlr.get_schedule(name, num_warmup_steps=W, num_training_steps=T, **ours_kwargs)
    got = [PEAK * sched(k) for k in STEPS]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    tensor_got = PEAK * sched(torch.tensor(list(STEPS)))
    assert tensor_got.dtype == torch.float64
    assert tensor_got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


TORCH_CASES = [
    ("step", {"step_size": 9, "gamma": 0.5}, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=9, gamma=0.5)),
    (
        "multistep",
        {"milestones": [30, 5, 12], "gamma": 0.3},
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[5, 12, 30], gamma=0.3),
    ),
    ("exponential", {"gamma": 0.97}, lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.97)),
    (
        "onecycle",
        {},
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=PEAK, total_steps=T, cycle_momentum=False),
    ),
    (
        "onecycle",
        {"pct_start": 0.4, "anneal_strategy": "linear", "div_factor": 10.0, "final_div_factor": 100.0},
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=PEAK, total_steps=T, pct_start=0.4, anneal_strategy="linear", div_factor=10.0,
            final_div_factor=100.0, cycle_momentum=False,
        ),
    ),
    (
        "onecycle",
        {"three_phase": True, "pct_start": 0.25},
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=PEAK, total_steps=T, three_phase=True, pct_start=0.25, cycle_momentum=False
        ),
    ),
]


@pytest.mark.parametrize("name,kwargs,make", TORCH_CASES, ids=[c[0] + str(i) for i, c in enumerate(TORCH_CASES)])
def test_matches_torch_schedulers(name: str, kwargs: dict, make) -> None:
    opt = _opt()
    n = T if name == "onecycle" else len(STEPS)  # OneCycleLR refuses to step past total_steps
    expected = _lambda_lr_values(make(opt), opt, n)
    sched = fusedlr.get_schedule(name, num_training_steps=T, **kwargs)
    got = [PEAK * sched(k) for k in range(n)]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_onecycle_holds_last_value_after_the_end() -> None:
    sched = fusedlr.get_schedule("onecycle", num_training_steps=T)
    assert sched(T + 5) == pytest.approx(sched(T - 1))


def test_closed_form_has_no_drift_at_large_steps() -> None:
    """ExponentialLR recurses (multiplies by gamma each step); the closed form stays exact."""
    sched = fusedlr.get_schedule("exponential", gamma=0.999999)
    k = 3_000_000
    assert sched(k) == pytest.approx(math.exp(k * math.log(0.999999)), rel=1e-12)
    cos = fusedlr.get_schedule("cosine", num_warmup_steps=1000, num_training_steps=50_000_000)
    assert cos(25_000_500) == pytest.approx(0.5 * (1 + math.cos(math.pi * 25_000_500 / 49_999_000 - math.pi * 1000 / 49_999_000)), rel=1e-12)


def test_every_name_builds_and_encodes() -> None:
    extra = {
        "polynomial": {"lr_init": 1.0},
        "cosine_with_min_lr": {"min_lr_rate": 0.1},
        "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
        "warmup_stable_decay": {"num_decay_steps": 3},
        "step": {"step_size": 2},
        "multistep": {"milestones": [3]},
        "exponential": {"gamma": 0.9},
    }
    for name in SCHEDULE_NAMES:
        s = fusedlr.get_schedule(name, num_warmup_steps=2, num_training_steps=10, **extra.get(name, {}))
        table = s.as_tensor()
        assert table.dtype == torch.float64 and int(table[0]) == int(s.kind)
        assert table[1:].tolist() == list(s.params)
        assert 0.0 <= s(0) <= 1.0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: fusedlr.get_schedule("cosinus", 1, 10), "unknown schedule name"),
        (lambda: fusedlr.get_schedule("linear", num_warmup_steps=-1, num_training_steps=10), "num_warmup_steps"),
        (lambda: fusedlr.get_schedule("linear", num_warmup_steps=11, num_training_steps=10), "num_warmup_steps"),
        (lambda: fusedlr.get_schedule("linear", num_warmup_steps=1), "num_training_steps"),
        (lambda: fusedlr.get_schedule("cosine", 1, 10, num_cycles=-1.0), "num_cycles"),
        (lambda: fusedlr.get_schedule("polynomial", 1, 10)(0), "absolute LRs"),
        (lambda: fusedlr.get_schedule("polynomial", 1, 10, lr_end=1.0, lr_init=0.5), "lr_end"),
        (lambda: fusedlr.get_schedule("cosine_with_min_lr", 1, 10), "min_lr_rate"),
        (lambda: fusedlr.get_schedule("warmup_stable_decay", 5, 10, num_decay_steps=6), "num_decay_steps"),
        (lambda: fusedlr.get_schedule("warmup_stable_decay", 1, 10, num_decay_steps=2, decay_type="exp"), "decay_type"),
        (lambda: fusedlr.get_schedule("multistep", milestones=[]), "milestones"),
        (lambda: fusedlr.get_schedule("step", step_size=0), "step_size"),
        (lambda: fusedlr.get_schedule("onecycle", num_training_steps=10, anneal_strategy="cosine"), "anneal_strategy"),
        (lambda: fusedlr.get_schedule("linear", 1, 10, bogus=1), "bogus"),
        (lambda: fusedlr.get_schedule("linear", 1, 10)(-1), "non-negative"),
        (lambda: fusedlr.get_schedule("linear", 1, 10)(torch.tensor([0.5])), "integer tensor"),
    ],
)
def test_invalid_arguments_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
