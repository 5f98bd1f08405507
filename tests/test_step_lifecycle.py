"""The step's cached plan against torch.optim.AdamW on every backend that runs on the CPU (``torch``,
``cpu`` when ``fusedlr._C`` is built, ``triton`` under the interpreter): parameter swaps
(``p.data = ...``, ``module.double()``/``.half()``, checkpoint loads), state resets, bad gradients
set after the first step, a tensor ``lr`` filled in place, and ``applied_lr``."""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict
from collections.abc import Iterator

import pytest
import torch

import fusedlr
from fusedlr import extension

CUDA = torch.cuda.is_available()
SCHED = fusedlr.get_schedule("cosine", num_warmup_steps=3, num_training_steps=12)


def _backends() -> list[str]:
    names = ["torch"]
    if extension.load_error() is None and extension.has_kernel("cpu"):
        names.append("cpu")
    if importlib.util.find_spec("triton") is None:
        return names
    # Without CUDA the Triton kernels run under the interpreter, which triton (its own jit helpers
    # included) and fusedlr.triton choose when first imported: import them now, with it set, as
    # tests/test_triton_backend.py does (torch's optimizer imports triton through dynamo later).
    saved = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import fusedlr.triton  # noqa: F401
    finally:
        if not CUDA:
            if saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved
    return names + ["triton"]


BACKENDS = _backends()


@pytest.fixture(autouse=True)
def _triton_interpreter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The interpreter must also be set while the Triton backend runs (fusedlr.triton checks it)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "triton" and not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def backward(model: torch.nn.Module, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
    model.zero_grad()
    dtype = next(model.parameters()).dtype
    ((model(x.to(dtype)) - y.to(dtype)) ** 2).float().mean().backward()


def pair(backend: str, **kw) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.nn.Module, torch.optim.Optimizer]:
    ours, ref = make_model(), make_model()
    opt = fusedlr.AdamW(ours.parameters(), lr=1e-2, backend=backend, **kw)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    return ours, opt, ref, topt


def steps(models_opts, rng: range) -> None:
    for i in rng:
        for model, opt in models_opts:
            backward(model, i)
            opt.step()


def assert_close_params(a: torch.nn.Module, b: torch.nn.Module, **tol) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, msg=lambda m: f"{name}: {m}", **(tol or dict(rtol=1e-5, atol=1e-6)))


# ---------------------------------------------------------------- parameter swaps (no stale pointers)
@pytest.mark.parametrize("backend", BACKENDS)
def test_p_data_swap_updates_the_new_storage(backend: str) -> None:
    ours, opt, ref, topt = pair(backend)
    steps([(ours, opt), (ref, topt)], range(2))
    old = []
    for pa, pb in zip(ours.parameters(), ref.parameters()):
        new = torch.randn(pa.shape, generator=torch.Generator().manual_seed(pa.numel()))
        old.append(pa.data)
        pa.data = new.clone()
        pb.data = new.clone()
    frozen = [t.clone() for t in old]
    steps([(ours, opt), (ref, topt)], range(2, 5))
    assert_close_params(ours, ref)
    for t, f in zip(old, frozen):
        assert torch.equal(t, f), "the old storage was written after p.data = new"


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_double_after_the_first_step_updates_the_live_params(backend: str) -> None:
    ours, opt, ref, topt = pair(backend)
    steps([(ours, opt), (ref, topt)], range(2))
    ours.double()
    ref.double()
    for p in ref.parameters():  # torch keeps the moments as they are; they are float64-exact either way
        for key in ("exp_avg", "exp_avg_sq"):
            topt.state[p][key] = topt.state[p][key].double()
    steps([(ours, opt), (ref, topt)], range(2, 5))
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    assert_close_params(ours, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_half_after_the_first_step_updates_the_live_params(backend: str) -> None:
    """fp16 params keep fp32 moments (fusedlr's contract); the reference is torch's AdamW on fp32
    params that start from the same fp16-rounded values, rounded back to fp16 after each step."""
    ours, opt, ref, topt = pair(backend)
    steps([(ours, opt), (ref, topt)], range(2))
    ours.half()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
    before = [p.detach().clone() for p in ours.parameters()]
    for i in range(2, 4):
        backward(ours, i)
        for pa, pb in zip(ours.parameters(), ref.parameters()):
            pb.grad = pa.grad.float()
        opt.step()
        topt.step()
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.half().float())
    for b, p in zip(before, ours.parameters()):
        assert p.dtype == torch.float16 and not torch.equal(b, p)
    assert_close_params(ours, ref.half(), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loading_checkpoints_after_the_first_step(backend: str) -> None:
    ours, opt, ref, topt = pair(backend)
    steps([(ours, opt), (ref, topt)], range(3))
    donor, donor_opt = make_model(seed=5), None
    donor_opt = torch.optim.AdamW(donor.parameters(), lr=1e-2, foreach=False)
    steps([(donor, donor_opt)], range(10, 12))
    for model, o in ((ours, opt), (ref, topt)):
        model.load_state_dict(donor.state_dict())
        o.load_state_dict(donor_opt.state_dict())
    steps([(ours, opt), (ref, topt)], range(3, 6))
    assert_close_params(ours, ref)


# ---------------------------------------------------------------- state reset
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset", ["clear", "new_mapping"])
def test_state_reset_restarts_the_moments(backend: str, reset: str) -> None:
    results = []
    for make in (lambda p: fusedlr.AdamW([p], lr=0.1, backend=backend), lambda p: torch.optim.AdamW([p], lr=0.1)):
        p = torch.nn.Parameter(torch.ones(1))
        opt = make(p)
        for grad in (1.0, 1.0, "reset", -1.0):
            if grad == "reset":
                if reset == "clear":
                    opt.state.clear()
                else:
                    opt.state = defaultdict(dict)
                continue
            p.grad = torch.full((1,), grad)
            opt.step()
        results.append((p.detach().clone(), int(opt.state_dict()["state"][0]["step"])))
    (ours, our_step), (ref, ref_step) = results
    torch.testing.assert_close(ours, ref)
    assert our_step == ref_step == 1


# ---------------------------------------------------------------- bad gradients after the first step
def _snapshot(opt: fusedlr.AdamW) -> list[torch.Tensor]:
    out = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    for s in opt.state.values():
        out += [v.detach().clone() for v in s.values()]
    return out + [opt.schedule_index.clone()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["shape", "int32", "sparse"])
def test_a_bad_gradient_after_the_first_step_is_refused_before_anything_changes(backend: str, bad: str) -> None:
    model = make_model()
    opt = fusedlr.AdamW(model.parameters(), lr=1e-2, schedule=SCHED, max_grad_norm=1.0, backend=backend)
    backward(model, 0)
    opt.step()
    backward(model, 1)
    target = model[2].bias
    if bad == "shape":
        target.grad.data = torch.ones(1)
    elif bad == "int32":
        target.grad.data = torch.ones(target.shape, dtype=torch.int32)
    else:
        target.grad = torch.ones(target.shape).to_sparse()
    before = _snapshot(opt)
    with pytest.raises(RuntimeError, match="parameter 3"):
        opt.step()
    for b, a in zip(before, _snapshot(opt)):
        assert torch.equal(b, a)
    target.grad = torch.ones(target.shape)  # fixed: the step runs
    opt.step()
    assert int(opt.schedule_index) == 2


# ---------------------------------------------------------------- tensor lr and applied_lr
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
def test_tensor_lr_filled_in_place_matches_torch(backend: str, lr_dtype: torch.dtype) -> None:
    ours, ref = make_model(), make_model()
    lr, tlr = torch.tensor(1e-2, dtype=lr_dtype), torch.tensor(1e-2, dtype=lr_dtype)
    opt = fusedlr.AdamW(ours.parameters(), lr=lr, weight_decay=0.1, backend=backend)
    topt = torch.optim.AdamW(ref.parameters(), lr=tlr, weight_decay=0.1, foreach=False)
    for i in range(5):
        lr.fill_(1e-2 / (i + 1))
        tlr.fill_(1e-2 / (i + 1))
        steps([(ours, opt), (ref, topt)], range(i, i + 1))
        assert_close_params(ours, ref)
        torch.testing.assert_close(opt.applied_lr(), lr.double())


def test_tensor_lr_elsewhere_or_of_another_shape_is_refused() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="1-element"):
        fusedlr.AdamW([p], lr=torch.ones(2))
    with pytest.raises(ValueError, match="1-element"):
        fusedlr.AdamW([p], lr=torch.tensor(1, dtype=torch.int64))
    opt = fusedlr.AdamW([p], lr=torch.tensor(0.1), backend="torch")
    opt.param_groups[0]["lr"] = torch.tensor(0.1, device="meta")
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="lr'\\] is a tensor on meta"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_applied_lr_follows_lambdalr_and_ignores_skipped_steps(backend: str) -> None:
    ours, ref = make_model(), make_model()
    param_groups = lambda m, lr: [  # noqa: E731
        {"params": [m[0].weight, m[2].weight]},
        {"params": [m[0].bias, m[2].bias], "lr": lr * 3},
    ]
    opt = fusedlr.AdamW(param_groups(ours, 1e-2), lr=1e-2, schedule=SCHED, backend=backend)
    topt = torch.optim.AdamW(param_groups(ref, 1e-2), lr=1e-2, foreach=False)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, SCHED)
    assert torch.isnan(opt.applied_lr(0)) and torch.isnan(opt.applied_lr(1))
    assert opt.applied_lr().dtype == torch.float64 and opt.applied_lr().shape == ()
    skipped = {3}
    for i in range(7):
        backward(ours, i)
        backward(ref, i)
        before = [opt.applied_lr(g).clone() for g in range(2)]
        opt.found_inf = torch.tensor(1.0 if i in skipped else 0.0)
        opt.step()
        if i in skipped:
            for g in range(2):
                torch.testing.assert_close(opt.applied_lr(g), before[g], equal_nan=True)
            continue
        used = [group["lr"] for group in topt.param_groups]
        topt.step()
        tsched.step()
        for g in range(2):
            torch.testing.assert_close(opt.applied_lr(g), torch.tensor(used[g], dtype=torch.float64), rtol=1e-12, atol=0)
        assert_close_params(ours, ref)


def test_applied_lr_grows_with_add_param_group() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = fusedlr.AdamW([a], lr=0.1, backend="torch")
    a.grad = torch.ones(2)
    opt.step()
    opt.add_param_group({"params": [b], "lr": 0.3})
    assert float(opt.applied_lr(0)) == 0.1 and torch.isnan(opt.applied_lr(1))
    b.grad = torch.ones(3)
    opt.step()
    assert float(opt.applied_lr(1)) == 0.3


# ---------------------------------------------------------------- deterministic norm
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_norm_and_params_are_bitwise_reproducible_under_deterministic_algorithms(backend: str) -> None:
    """Several programs/blocks per tensor (5000 > one chunk), so the two-stage reduction is exercised."""
    runs = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(n)) for n in (5000, 3, 9000)]
            opt = fusedlr.AdamW(params, lr=1e-2, max_grad_norm=0.5, backend=backend)
            norms = []
            for i in range(3):
                g = torch.Generator().manual_seed(i)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g)
                expected = torch.nn.utils.get_total_norm([p.grad for p in params])
                opt.step()
                torch.testing.assert_close(opt.grad_norm, expected, rtol=1e-5, atol=0)
                norms.append(opt.grad_norm.clone())
            runs.append((norms, [p.detach().clone() for p in params]))
    finally:
        torch.use_deterministic_algorithms(previous)
    (n1, p1), (n2, p2) = runs
    assert all(torch.equal(a, b) for a, b in zip(n1 + p1, n2 + p2))
