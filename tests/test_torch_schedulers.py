"""from_torch_scheduler against torch's own schedulers stepped as a training loop steps them, the new
schedule kinds on every backend (C++ kernel, Triton under the interpreter) against the reference, and
DevicePlateau against torch's ReduceLROnPlateau decisions."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

import fusedlr

LR = 0.1


def _opt(groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": LR * (i + 1)} for i in range(groups)]
    return torch.optim.SGD(params, lr=LR)


def _torch_lrs(opt: torch.optim.Optimizer, sched: L.LRScheduler, n: int) -> list[list[float]]:
    """The LR of each group for each of n updates, read off the groups as a training loop would."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "step() before optimizer.step()" and friends
        for _ in range(n):
            out.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
    return out


CASES = {
    "StepLR": lambda o: L.StepLR(o, step_size=9, gamma=0.5),
    "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[30, 5, 12, 12], gamma=0.3),
    "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.97),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=37, eta_min=0.001),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=7, T_mult=2, eta_min=0.002),
    "CosineAnnealingWarmRestarts-1": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=5),
    "LinearLR": lambda o: L.LinearLR(o, start_factor=0.1, end_factor=0.9, total_iters=20),
    "ConstantLR": lambda o: L.ConstantLR(o, factor=0.3, total_iters=20),
    "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=50, power=2.0),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=1.0, total_steps=300, cycle_momentum=False),
    "OneCycleLR-3": lambda o: L.OneCycleLR(
        o, max_lr=0.5, total_steps=300, three_phase=True, anneal_strategy="linear", cycle_momentum=False
    ),
    "CyclicLR": lambda o: L.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=10, cycle_momentum=False),
    "CyclicLR-2": lambda o: L.CyclicLR(
        o, base_lr=0.01, max_lr=0.1, step_size_up=10, step_size_down=7, mode="triangular2", cycle_momentum=False
    ),
    "CyclicLR-exp": lambda o: L.CyclicLR(
        o, base_lr=0.01, max_lr=0.1, step_size_up=10, mode="exp_range", gamma=0.99, cycle_momentum=False
    ),
    "SequentialLR": lambda o: L.SequentialLR(
        o,
        [L.LinearLR(o, 0.01, total_iters=10), L.CosineAnnealingLR(o, T_max=100, eta_min=0.001), L.ExponentialLR(o, 0.99)],
        milestones=[10, 110],
    ),
    "SequentialLR-restarts": lambda o: L.SequentialLR(
        o, [L.ConstantLR(o, 0.1, total_iters=10), L.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2)], milestones=[20]
    ),
    "ChainedScheduler": lambda o: L.ChainedScheduler(
        [L.LinearLR(o, 0.01, total_iters=10), L.ExponentialLR(o, 0.99), L.MultiStepLR(o, [50, 80])]
    ),
}
N = 300
ABSOLUTE_ETA = {"CosineAnnealingLR", "CosineAnnealingWarmRestarts", "SequentialLR"}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("groups", [1, 2])
def test_matches_torch_update_for_update(name: str, groups: int) -> None:
    opt = _opt(groups)
    sched = CASES[name](opt)
    if groups > 1 and name in ABSOLUTE_ETA:  # one eta_min, two initial LRs: two different multipliers
        with pytest.raises(ValueError, match="differs between param groups"):
            fusedlr.from_torch_scheduler(sched)
        return
    schedule = fusedlr.from_torch_scheduler(sched)
    peaks = [g["initial_lr"] for g in opt.param_groups]
    expected = _torch_lrs(opt, sched, N)
    mult = schedule(torch.arange(N))
    for g, peak in enumerate(peaks):
        got = (peak * mult).tolist()
        want = [row[g] for row in expected]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15 * peak)


def test_the_optimizer_applies_what_torch_would_set() -> None:
    """A torch AdamW + scheduler checkpoint resumed by fusedlr.AdamW(schedule=from_torch_scheduler(...))."""
    p = torch.nn.Parameter(torch.zeros(3))
    topt = torch.optim.AdamW([p], lr=0.05)
    tsched = L.SequentialLR(topt, [L.LinearLR(topt, 0.1, total_iters=4), L.CosineAnnealingLR(topt, T_max=20)], [4])
    expected = [row[0] for row in _torch_lrs(topt, tsched, 12)]
    q = torch.nn.Parameter(torch.zeros(3))
    opt = fusedlr.AdamW([q], lr=0.05, schedule=fusedlr.from_torch_scheduler(tsched), backend="torch")
    got = []
    for _ in range(12):
        q.grad = torch.ones(3)
        opt.step()
        got.append(float(opt.applied_lr()))
    assert got == pytest.approx(expected, rel=1e-12)


def _restarts_by_counting(k: int, t0: int, t_mult: int) -> tuple[int, int]:
    """CosineAnnealingWarmRestarts' integer (T_cur, T_i) after k steps, cycle by cycle (exact)."""
    t_i = t0
    while k >= t_i:
        k -= t_i
        t_i *= t_mult
    return k, t_i


def test_closed_forms_hold_for_a_million_updates() -> None:
    """At sampled k up to 10^6: torch's closed forms (``_get_closed_form_lr``, what its chainable
    updates compute up to rounding) and exact integer counting for the warm restarts."""
    ks = [0, 1, 7, 999, 12_345, 500_000, 999_999, 1_000_000]
    for make in (
        lambda o: L.CosineAnnealingLR(o, T_max=333_333, eta_min=0.001),
        lambda o: L.LinearLR(o, start_factor=0.2, total_iters=777_777),
        lambda o: L.PolynomialLR(o, total_iters=1_200_000, power=1.5),
        lambda o: L.ExponentialLR(o, gamma=0.999_999),
        lambda o: L.StepLR(o, step_size=30_000, gamma=0.9),
        lambda o: L.ConstantLR(o, factor=0.5, total_iters=600_000),
    ):
        opt = _opt()
        sched = make(opt)
        schedule = fusedlr.from_torch_scheduler(sched)
        for k in ks:
            sched.last_epoch = k
            want = sched._get_closed_form_lr()[0]
            assert LR * schedule(k) == pytest.approx(want, rel=1e-6, abs=1e-18), (type(sched).__name__, k)
    for t0, t_mult in ((7, 2), (100, 3), (1000, 1)):
        schedule = fusedlr.from_torch_scheduler(L.CosineAnnealingWarmRestarts(_opt(), T_0=t0, T_mult=t_mult, eta_min=0.01))
        fifth = t0 * (t_mult**5 - 1) // (t_mult - 1) if t_mult > 1 else 5 * t0  # first update of cycle 5
        for k in ks + [fifth - 1, fifth, fifth + 1]:
            t_cur, t_i = _restarts_by_counting(k, t0, t_mult)
            want = 0.01 + (LR - 0.01) * (1 + math.cos(math.pi * t_cur / t_i)) / 2
            assert LR * schedule(k) == pytest.approx(want, rel=1e-6), (t0, t_mult, k)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda o: L.LambdaLR(o, lambda k: 0.9**k), "Python function"),
        (lambda o: L.MultiplicativeLR(o, lambda k: 0.9), "Python function"),
        (lambda o: L.ReduceLROnPlateau(o), "DevicePlateau"),
        (lambda o: L.OneCycleLR(o, max_lr=1.0, total_steps=10), "cycle_momentum=False"),
        (lambda o: L.CyclicLR(o, 0.01, 0.1, scale_fn=lambda x: 1.0, cycle_momentum=False), "scale_fn"),
        (lambda o: L.ChainedScheduler([L.CosineAnnealingLR(o, 10), L.ExponentialLR(o, 0.9)]), "SequentialLR"),
        (lambda o: L.SequentialLR(o, [L.LambdaLR(o, lambda k: 1.0), L.ExponentialLR(o, 0.9)], [3]), "Python function"),
    ],
)
def test_refuses_what_has_no_closed_form(make, match: str) -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    with pytest.raises(ValueError, match=match):
        fusedlr.from_torch_scheduler(make(opt))


def test_refuses_absolute_lrs_that_differ_per_group() -> None:
    with pytest.raises(ValueError, match="differs between param groups"):
        fusedlr.from_torch_scheduler(L.CosineAnnealingLR(_opt(2), T_max=10, eta_min=0.01))


# ---------------------------------------------------------------- composites
def test_combining_checks_its_arguments() -> None:
    from fusedlr.schedules import product, sequential

    gs = fusedlr.get_schedule
    with pytest.raises(ValueError, match="milestones"):
        sequential([gs("constant"), gs("constant")], [])
    with pytest.raises(ValueError, match="another combined"):
        product([product([gs("constant")])])
    with pytest.raises(ValueError, match="1 to 5"):
        product([gs("constant")] * 6)


# ---------------------------------------------------------------- ReduceLROnPlateau on the device
PLATEAU = [
    dict(mode="min", factor=0.5, patience=2),
    dict(mode="max", factor=0.1, patience=1, threshold=0.05, cooldown=2),
    dict(mode="min", factor=0.3, patience=0, threshold=0.1, threshold_mode="abs", min_lr=0.01),
]


@pytest.mark.parametrize("kwargs", PLATEAU, ids=str)
@pytest.mark.parametrize("with_schedule", [False, True])
def test_device_plateau_decides_as_torch(kwargs: dict, with_schedule: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    metrics = (torch.randn(60, generator=gen) * 0.3 + torch.linspace(3, 0, 60)).tolist()
    topt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    tplateau = L.ReduceLROnPlateau(topt, **kwargs)
    q = torch.nn.Parameter(torch.zeros(2))
    sched = fusedlr.get_schedule("exponential", gamma=0.99) if with_schedule else None
    opt = fusedlr.AdamW([q], lr=LR, schedule=sched, backend="torch")
    plateau = fusedlr.DevicePlateau(opt, **kwargs)
    for k, m in enumerate(metrics):
        q.grad = torch.ones(2)
        announced = opt.scheduled_lr().clone()  # the next update's LR, plateau reductions included
        opt.step()
        want = topt.param_groups[0]["lr"] * (0.99**k if with_schedule else 1.0)
        assert float(opt.applied_lr()) == pytest.approx(want, rel=1e-12), k
        assert float(announced) == float(opt.applied_lr()), k
        tplateau.step(m)
        plateau.step(torch.tensor(m))
    assert topt.param_groups[0]["lr"] < LR  # the sequence did reduce the LR


def test_device_plateau_is_read_by_the_cpu_kernel() -> None:
    from fusedlr import extension

    if extension.load_error() is not None:
        pytest.skip(f"extension not built: {extension.load_error()}")
    params = [torch.nn.Parameter(torch.ones(5)) for _ in range(2)]
    opts = [fusedlr.AdamW([p], lr=LR, backend=b) for p, b in zip(params, ("torch", "cpu"))]
    plateaus = [fusedlr.DevicePlateau(o, factor=0.5, patience=0) for o in opts]
    for metric in (1.0, 2.0, 3.0, 0.5):
        for p, o, pl in zip(params, opts, plateaus):
            p.grad = torch.full((5,), 0.3)
            o.step()
            pl.step(torch.tensor(metric))
    torch.testing.assert_close(params[0], params[1], rtol=1e-6, atol=1e-7)
    assert float(plateaus[0].multiplier) == 0.25
