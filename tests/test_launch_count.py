"""The folded step (``fusedlr.control.FoldedUpdate``): on a backend that folds (``cpu`` through its ops, ``cuda``),
a steady-state step is one pass-1 and one update launch per launch set (``cpu``: the buckets of every param group
sharing device, dtypes, amsgrad and precision mode, in one ``grad_stats_set`` and one ``adamw_update_set``; the
CUDA kernels: one pass-1 launch per gradient dtype and one update launch per launch set) and nothing else (the
eager fast path disabled, so that the ops run), and its results are torch's recipe's: ``torch.optim.AdamW`` +
``clip_grad_norm_`` + ``LambdaLR`` + ``GradScaler`` (with skipped steps), with ``grad_norm``, ``applied_lr``,
GradScaler's ``found_inf``, the schedule index and the state steps after each step. "emu" runs the same steps
through the CUDA kernels themselves on the host (tests/cuda_on_host.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedlr
from fusedlr import fast_step

from cuda_on_host import EmulatedCudaBackend, fusedlr_kernels
from test_extension import needs_cuda, needs_ext, needs_host_cuda

pytestmark = [pytest.mark.filterwarnings("ignore:GradScaler is going to stop:FutureWarning")]

SCHED = fusedlr.get_schedule("cosine", num_warmup_steps=2, num_training_steps=12)
LR = 1e-2


class _Ops(TorchDispatchMode):
    """The ops dispatched while active (``profiler.*`` records left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not str(func).startswith("profiler."):
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _model(seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)


def _groups(model: torch.nn.Module, spec: str) -> list[dict]:
    """The param groups of ``spec`` (a key of ``PEAKS``): one; two (weights decayed; biases not, with their own
    LR, betas and eps); three (each layer's weight its own group with its own LR, betas and weight decay, then
    the biases), the second group's LR a float64 tensor with "lr tensor"."""
    if spec == "1":
        return [{"params": list(model.parameters())}]
    named = dict(model.named_parameters())
    biases = {"params": [named["0.bias"], named["2.bias"]], "weight_decay": 0.0, "lr": LR * 3, "betas": (0.8, 0.99),
              "eps": 1e-6}
    if spec == "2":
        return [{"params": [named["0.weight"], named["2.weight"]], "weight_decay": 0.1}, biases]
    lr2 = torch.tensor(LR * 2, dtype=torch.float64) if spec.endswith("lr tensor") else LR * 2
    return [
        {"params": [named["0.weight"]], "weight_decay": 0.1},
        {"params": [named["2.weight"]], "weight_decay": 0.05, "lr": lr2, "betas": (0.85, 0.995)},
        biases,
    ]


# each group's peak LR, as a multiple of LR, per ``_groups`` spec
PEAKS = {"1": [1], "2": [1, 3], "3": [1, 2, 3], "3, lr tensor": [1, 2, 3]}


def _loss(model: torch.nn.Module, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    device = next(model.parameters()).device
    x, y = torch.randn(32, 5, generator=g).to(device), torch.randn(32, 3, generator=g).to(device)
    return ((model(x) - y) ** 2).mean() * 10.0


# name: (param groups (``_groups``), GradScaler, max_grad_norm, ops of a steady step)
CASES = {
    "plain": ("1", False, None, ["adamw_update_set"]),
    "clip": ("1", False, 0.5, ["grad_stats_set", "adamw_update_set"]),
    "amp+clip": ("1", True, 0.5, ["grad_stats_set", "adamw_update_set"]),
    "amp": ("1", True, None, ["grad_stats_set", "adamw_update_set"]),
    "2groups+clip": ("2", False, 0.5, ["grad_stats_set", "adamw_update_set"]),
    "2groups+amp+clip": ("2", True, 0.5, ["grad_stats_set", "adamw_update_set"]),
    "3groups+amp+clip": ("3", True, 0.5, ["grad_stats_set", "adamw_update_set"]),
    "3groups, lr tensor": ("3, lr tensor", False, 0.5, ["grad_stats_set", "adamw_update_set"]),
}


def _opt(model: torch.nn.Module, groups: str, clip: float | None, backend: str) -> fusedlr.AdamW:
    kw = dict(lr=LR, schedule=SCHED, max_grad_norm=clip)
    if backend != "emu":
        return fusedlr.AdamW(_groups(model, groups), backend=backend, **kw)
    opt = fusedlr.AdamW(_groups(model, groups), backend="torch", **kw)
    shim = fusedlr_kernels()
    shim.configure(0)
    opt._step_cache.update(impl=EmulatedCudaBackend(shim, grid=3), impl_device=torch.device("cpu"))
    return opt


def _train_step(model: torch.nn.Module, opt: fusedlr.AdamW, scaler: torch.amp.GradScaler | None, i: int,
                bad: bool = False, step: Callable[[Callable[[], None]], None] = lambda run: run(),
                unscale: bool = False) -> None:
    """One step (``step`` wraps the optimizer's); ``bad`` puts an inf in a gradient; ``unscale``: the user
    calls ``scaler.unscale_(opt)`` first."""
    opt.zero_grad()
    loss = _loss(model, i)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if bad:
        model[2].weight.grad[0, 0] = float("inf")
    if unscale:
        scaler.unscale_(opt)
    step(opt.step if scaler is None else lambda: scaler.step(opt))
    if scaler is not None:
        scaler.update()


def _counted(ops: _Ops) -> Callable[[Callable[[], None]], None]:
    """A ``step`` wrapper of ``_train_step`` recording the step's ops into ``ops``."""

    def step(run: Callable[[], None]) -> None:
        with ops:
            run()

    return step


@needs_ext
@pytest.mark.parametrize("case", CASES)
def test_a_steady_step_is_one_launch_per_launch_set_and_pass(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    groups, amp, clip, want = CASES[case]
    monkeypatch.setattr(fast_step, "ENABLED", False)
    model = _model()
    opt = _opt(model, groups, clip, "cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if amp else None
    ops = _Ops()
    for i in range(3):
        ops.names.clear()
        _train_step(model, opt, scaler, i, step=_counted(ops))
    assert ops.names == [f"fusedlr.{name}.default" for name in want]


@needs_ext
def test_history_keeps_the_python_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """``history=`` records a row from the step's values: that step is not folded (and still correct)."""
    monkeypatch.setattr(fast_step, "ENABLED", False)
    model = _model()
    opt = fusedlr.AdamW(model.parameters(), lr=LR, max_grad_norm=0.5, backend="cpu", history=4)
    ops = _Ops()
    for i in range(2):
        ops.names.clear()
        _train_step(model, opt, None, i, step=_counted(ops))
    assert ops.names.count("fusedlr.adamw_update.default") == 1 and len(ops.names) > 2
    assert opt.read_history().schedule_index == [0, 1]


BACKENDS = [pytest.param("cpu", marks=needs_ext), pytest.param("emu", marks=needs_host_cuda)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", ["clip", "amp+clip", "2groups+amp+clip", "3groups+amp+clip", "3groups, lr tensor", "plain",
             "amp+clip, unscale_ first"]
)
def test_folded_steps_match_torch_recipe(backend: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps 3 and 7 have an inf gradient: with GradScaler they change nothing (params, moments, steps, k,
    applied LR, which stays the last applied update's) and report found_inf = 1 and the (inf) norm, as torch's
    recipe does (also when the user unscales first: the step then honours the recorded found_inf)."""
    unscale = case.endswith("unscale_ first")
    groups, amp, clip, _ = CASES[case.removesuffix(", unscale_ first")]
    monkeypatch.setattr(fast_step, "ENABLED", False)
    ours, ref = _model(), _model()
    opt = _opt(ours, groups, clip, backend)
    topt = torch.optim.AdamW(_groups(ref, groups), lr=LR)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, SCHED)
    s1, s2 = (torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3) if amp else None for _ in range(2))
    bad_steps = {3, 7} if amp else set()
    applied = 0
    seen: dict[str, torch.Tensor] = {}

    def watch(run: Callable[[], None]) -> None:  # GradScaler's found_inf as the step leaves it for update()
        run()
        if s1 is not None:
            seen["found_inf"] = s1._per_optimizer_states[id(opt)]["found_inf_per_device"][torch.device("cpu")].clone()

    for i in range(10):
        bad = i in bad_steps
        _train_step(ours, opt, s1, i, bad, step=watch, unscale=unscale)
        topt.zero_grad()
        loss = _loss(ref, i)
        (loss if s2 is None else s2.scale(loss)).backward()
        if bad:
            ref[2].weight.grad[0, 0] = float("inf")
        if s2 is not None:
            s2.unscale_(topt)
        norm = None if clip is None else torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        if s2 is None:
            topt.step()
        else:
            s2.step(topt)
            s2.update()
            assert s1.get_scale() == s2.get_scale()
            assert float(seen["found_inf"]) == float(bad)
        if not bad:
            tsched.step()
            applied += 1
        for pa, pb in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
            if topt.state[pb]:
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(opt.state[pa][key], topt.state[pb][key], rtol=1e-5, atol=1e-7)
            assert int(opt.state[pa]["step"]) == applied
        assert int(opt.schedule_index) == applied
        if norm is not None:
            torch.testing.assert_close(opt.grad_norm, norm, rtol=1e-5, atol=0, equal_nan=True)
        for gi, mult in enumerate(PEAKS[groups]):
            peak = LR * mult
            want = peak * SCHED(applied - 1) if applied else math.nan
            torch.testing.assert_close(float(opt.applied_lr(gi)), want, rtol=1e-12, atol=0, equal_nan=True)
        if bad:
            assert math.isinf(float(opt.grad_norm))


def _recording(method: Callable, name: str, launches: list[str]) -> Callable:
    """``method``, appending ``name`` to ``launches`` at each call."""

    def run(*args, **kwargs):
        launches.append(name)
        return method(*args, **kwargs)

    return run


def _mixed_params() -> list[torch.Tensor]:
    torch.manual_seed(3)
    shapes = [((4, 3), torch.float32), ((5,), torch.float64), ((7,), torch.float32), ((2, 2), torch.float64)]
    return [torch.randn(shape, dtype=dtype, requires_grad=True) for shape, dtype in shapes]


def _mixed_groups(params: list[torch.Tensor]) -> list[dict]:
    """Three groups of their own LR, betas and weight decay; float32 params in groups 0 and 2, float64 ones in
    groups 1 and 2."""
    return [
        {"params": [params[0]], "weight_decay": 0.1},
        {"params": [params[1]], "lr": LR * 2, "betas": (0.85, 0.995), "weight_decay": 0.05},
        {"params": [params[2], params[3]], "lr": LR * 3, "betas": (0.8, 0.99), "weight_decay": 0.0, "eps": 1e-6},
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_update_launch_per_dtype(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups mixing float32 and float64 params, equal to torch's recipe (AdamW + clip_grad_norm_ + LambdaLR).
    cpu: one pass-1 op for the whole step and one update op per dtype (the float32 buckets of groups 0 and 2
    together, the float64 ones of groups 1 and 2); the CUDA kernels ("emu"): one pass-1 launch per dtype and one
    update launch per dtype (launch set)."""
    monkeypatch.setattr(fast_step, "ENABLED", False)
    ours, ref = _mixed_params(), _mixed_params()
    kw = dict(lr=LR, schedule=SCHED, max_grad_norm=0.5)
    opt = fusedlr.AdamW(_mixed_groups(ours), backend="cpu" if backend == "cpu" else "torch", **kw)
    launches: list[str] = []
    if backend == "emu":
        shim = fusedlr_kernels()
        shim.configure(0)
        emu = EmulatedCudaBackend(shim, grid=3)
        for name in ("grad_stats", "adamw_update_set"):
            monkeypatch.setattr(emu, name, _recording(getattr(emu, name), name, launches))
        opt._step_cache.update(impl=emu, impl_device=torch.device("cpu"))
    topt = torch.optim.AdamW(_mixed_groups(ref), lr=LR)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, SCHED)
    ops = _Ops()
    for i in range(6):
        gen = torch.Generator().manual_seed(100 + i)
        for pa, pb in zip(ours, ref):
            pa.grad = torch.randn(pa.shape, generator=gen, dtype=torch.float64).to(pa.dtype)
            pb.grad = pa.grad.clone()
        ops.names.clear()
        launches.clear()
        with ops:
            opt.step()
        norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        topt.step()
        tsched.step()
        if i > 0 and backend == "cpu":  # the first step also creates the states
            assert ops.names == ["fusedlr.grad_stats_set.default"] + ["fusedlr.adamw_update_set.default"] * 2
        if backend == "emu":
            assert launches == ["grad_stats"] * 2 + ["adamw_update_set"] * 2
        torch.testing.assert_close(opt.grad_norm, norm.float(), rtol=1e-5, atol=0)
        for pa, pb in zip(ours, ref):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)
            assert int(opt.state[pa]["step"]) == i + 1
        for gi, mult in enumerate([1, 2, 3]):
            torch.testing.assert_close(float(opt.applied_lr(gi)), LR * mult * SCHED(i), rtol=1e-12, atol=0)


@needs_ext
@pytest.mark.parametrize("case", ["3groups+amp+clip", "3groups, lr tensor"])
def test_launch_sets_equal_one_launch_per_bucket(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Merging the buckets of several groups into one op changes no bit, nor any version counter, of a step
    with one ``adamw_update`` per bucket (the cpu backend without ``SETS``)."""
    from fusedlr.extension import cpu

    groups, amp, clip, _ = CASES[case]
    monkeypatch.setattr(fast_step, "ENABLED", False)
    runs = []
    for sets in (True, False):
        monkeypatch.setattr(cpu, "SETS", sets)
        model = _model()
        opt = _opt(model, groups, clip, "cpu")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if amp else None
        ops = _Ops()
        for i in range(5):
            ops.names.clear()
            _train_step(model, opt, scaler, i, bad=amp and i == 2, step=_counted(ops))
        assert len(ops.names) == (2 if sets else 4)  # grad_stats_set, then one adamw_update_set or 3 adamw_update
        snap = [opt.grad_norm.clone(), opt.schedule_index.clone()]
        for p in model.parameters():
            snap += [p.detach().clone(), p._version]
            snap += [opt.state[p][key] for key in ("exp_avg", "exp_avg_sq", "step")]
            snap += [opt.state[p][key]._version for key in ("exp_avg", "exp_avg_sq", "step")]
        snap += [opt.applied_lr(gi) for gi in range(3)]
        runs.append(snap)
    for a, b in zip(*runs):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        else:
            assert a == b


@needs_ext
@needs_cuda
@pytest.mark.gpu
def test_cuda_amp_clip_step_is_two_kernel_launches() -> None:
    """The torch profiler sees one grad_stats and one update kernel in a steady AMP + clipping step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model = _model(device="cuda")
    opt = fusedlr.AdamW(model.parameters(), lr=LR, schedule=SCHED, max_grad_norm=0.5, backend="cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    for i in range(2):  # warm-up: states, pointer tables
        _train_step(model, opt, scaler, i)
    torch.cuda.synchronize()
    opt.zero_grad()
    scaler.scale(_loss(model, 2)).backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        scaler.step(opt)
        torch.cuda.synchronize()
    # kernels only: a pointer table is re-uploaded (a host-to-device copy) when a new gradient lies elsewhere
    kernels = [
        e.name for e in prof.events() if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    assert len(kernels) == 2, kernels
    assert "grad_stats_kernel" in kernels[0] and "adamw_kernel" in kernels[1], kernels


@needs_ext
@needs_cuda
@pytest.mark.gpu
def test_cuda_two_groups_amp_clip_step_is_two_kernel_launches() -> None:
    """Two param groups of one dtype: pass 1 is one launch for both (``grad_stats_set``), pass 2 one for both
    (``adamw_update_set.cached``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model = _model(device="cuda")
    opt = fusedlr.AdamW(_groups(model, "2"), lr=LR, schedule=SCHED, max_grad_norm=0.5, backend="cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    for i in range(2):
        _train_step(model, opt, scaler, i)
    opt.zero_grad()
    scaler.scale(_loss(model, 2)).backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        scaler.step(opt)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA and not e.name.startswith("Mem")]
    assert len(kernels) == 2, kernels
    assert "grad_stats_kernel" in kernels[0] and "adamw_kernel" in kernels[1], kernels


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_scale_attribute_of_any_float_dtype(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The attribute contract's ``grad_scale`` may be float64: such a step is not folded (the kernels read a
    float32 scale) and still unscales as GradScaler would, as the reference does."""
    monkeypatch.setattr(fast_step, "ENABLED", False)
    results = []
    for backend in ("cpu", "torch"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
        opt = fusedlr.AdamW(params, lr=LR, max_grad_norm=1.0, backend=backend)
        opt.grad_scale = torch.tensor(1024.0 / 3.0, dtype=dtype)
        for i in range(3):
            for j, p in enumerate(params):
                p.grad = torch.randn(5) * 1024.0 / 3.0 * (i + j + 1)
            opt.step()
        results.append([p.detach().clone() for p in params] + [opt.grad_norm.clone()])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref)
