"""fusedlr.AdamW (reference backend) against torch's own recipe:
torch.optim.AdamW + clip_grad_norm_ + LambdaLR (+ GradScaler), step by step."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import fusedlr

DEV = torch.device("cpu")


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )
    return model.to(dtype)


def groups(model: torch.nn.Module, lr: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [
        {"params": decay, "weight_decay": 0.1},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr * 3, "betas": (0.8, 0.99), "eps": 1e-6},
    ]


def batch(i: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(32, 5, generator=g).to(dtype), torch.randn(32, 3, generator=g).to(dtype)


def loss_of(model: torch.nn.Module, i: int) -> torch.Tensor:
    x, y = batch(i, next(model.parameters()).dtype)
    return ((model(x) - y) ** 2).float().mean() * 10.0


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_same_moments(opt, topt, a: torch.nn.Module, b: torch.nn.Module) -> None:
    for pa, pb in zip(a.parameters(), b.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in topt.state[pb]:
                torch.testing.assert_close(opt.state[pa][key], topt.state[pb][key], rtol=1e-5, atol=1e-7)


SCHED = fusedlr.get_schedule("cosine", num_warmup_steps=4, num_training_steps=30)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("max_norm", [None, 0.05, 1e3], ids=["noclip", "clip", "clip-inactive"])
def test_matches_torch_recipe(amsgrad: bool, maximize: bool, max_norm: float | None) -> None:
    lr = 3e-3
    ours, ref = make_model(), make_model()
    opt = fusedlr.AdamW(groups(ours, lr), lr=lr, amsgrad=amsgrad, maximize=maximize, schedule=SCHED,
                        max_grad_norm=max_norm, backend="torch")
    topt = torch.optim.AdamW(groups(ref, lr), lr=lr, amsgrad=amsgrad, maximize=maximize)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, SCHED)
    clipped_once = False
    for i in range(30):
        for m, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            loss_of(m, i).backward()
        opt.step()
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
            clipped_once |= bool(norm > max_norm)
            assert opt.grad_norm is not None and opt.grad_norm.dim() == 0
            torch.testing.assert_close(opt.grad_norm, norm, rtol=1e-6, atol=0)
        topt.step()
        tsched.step()
        assert_same_params(ours, ref)
        assert_same_moments(opt, topt, ours, ref)  # Adam hides a wrong gradient scale in the params
    assert clipped_once == (max_norm == 0.05)
    for p in ours.parameters():
        assert int(opt.state[p]["step"]) == 30
    assert int(opt.schedule_index) == 30


def test_grads_are_not_modified_by_clipping() -> None:
    model = make_model()
    opt = fusedlr.AdamW(model.parameters(), max_grad_norm=1e-3, backend="torch")
    loss_of(model, 0).backward()
    before = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p.grad)


def test_without_schedule_a_torch_scheduler_drives_the_lr() -> None:
    transformers = pytest.importorskip("transformers")
    ours, ref = make_model(), make_model()
    opt = fusedlr.AdamW(ours.parameters(), lr=1e-2, backend="torch")
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    s1 = transformers.get_scheduler("linear", opt, num_warmup_steps=3, num_training_steps=12)
    s2 = transformers.get_scheduler("linear", topt, num_warmup_steps=3, num_training_steps=12)
    for i in range(12):
        for m, o, s in ((ours, opt, s1), (ref, topt, s2)):
            o.zero_grad()
            loss_of(m, i).backward()
            o.step()
            s.step()
        assert_same_params(ours, ref)


def test_low_precision_params_keep_fp32_state_and_track_fp32_math() -> None:
    """bf16 params: fp32 moments, fp32 math; compare with torch run on an fp32 copy, rounded each step."""
    ours, ref = make_model(dtype=torch.bfloat16), make_model(dtype=torch.bfloat16).float()
    opt = fusedlr.AdamW(ours.parameters(), lr=1e-2, backend="torch")
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for i in range(5):
        opt.zero_grad()
        topt.zero_grad()
        loss_of(ours, i).backward()
        for p, q in zip(ours.parameters(), ref.parameters()):
            q.grad = p.grad.float()
        opt.step()
        topt.step()
        with torch.no_grad():
            for p, q in zip(ours.parameters(), ref.parameters()):
                assert opt.state[p]["exp_avg"].dtype == torch.float32
                torch.testing.assert_close(opt.state[p]["exp_avg"], topt.state[q]["exp_avg"], rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(p, q.bfloat16(), rtol=0, atol=0)
                q.copy_(p.float())


def test_params_without_grad_are_skipped_and_keep_their_own_step() -> None:
    ours, ref = make_model(), make_model()
    opt = fusedlr.AdamW(ours.parameters(), lr=1e-2, backend="torch")
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for i in range(6):
        for m, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            loss_of(m, i).backward()
            if i % 2 == 1:
                m[0].weight.grad = None  # frozen on odd steps
            o.step()
        assert_same_params(ours, ref)
    assert int(opt.state[ours[0].weight]["step"]) == 3
    assert int(opt.state[ours[2].weight]["step"]) == 6


def test_zero_size_tensor_does_not_disturb_the_others() -> None:
    empty = torch.nn.Parameter(torch.zeros(0, 4))
    full = torch.nn.Parameter(torch.ones(7))
    ref = torch.nn.Parameter(torch.ones(7))
    opt = fusedlr.AdamW([empty, full], lr=0.1, max_grad_norm=1.0, backend="torch")
    topt = torch.optim.AdamW([ref], lr=0.1)
    for _ in range(3):
        empty.grad = torch.zeros(0, 4)
        full.grad = torch.full((7,), 0.1)
        ref.grad = full.grad.clone()
        opt.step()
        topt.step()
    torch.testing.assert_close(full, ref)


# ---------------------------------------------------------------- AMP
def _amp_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return make_model(), make_model()


@pytest.mark.parametrize("user_unscales", [False, True])
def test_grad_scaler_matches_torch_recipe_and_skips_bad_steps(user_unscales: bool) -> None:
    ours, ref = _amp_models()
    opt = fusedlr.AdamW(groups(ours, 1e-2), lr=1e-2, schedule=SCHED, max_grad_norm=0.5, backend="torch")
    topt = torch.optim.AdamW(groups(ref, 1e-2), lr=1e-2)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, SCHED)
    s1 = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    bad_steps = {2, 7}
    for i in range(12):
        for m, o, s in ((ours, opt, s1), (ref, topt, s2)):
            o.zero_grad()
            s.scale(loss_of(m, i)).backward()
            if i in bad_steps:
                m[2].weight.grad[0, 0] = float("inf") if i == 2 else float("nan")
        if user_unscales:
            s1.unscale_(opt)  # must not unscale twice inside step
        before = [p.detach().clone() for p in ours.parameters()]
        s1.step(opt)
        s1.update()
        s2.unscale_(topt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        s2.step(topt)
        s2.update()
        if i not in bad_steps:  # fusedlr's schedule index does not advance on a skipped step
            tsched.step()
        assert s1.get_scale() == s2.get_scale()
        if i in bad_steps:
            for b, p in zip(before, ours.parameters()):
                assert torch.equal(b, p)
        assert_same_params(ours, ref)
        if topt.state:
            assert_same_moments(opt, topt, ours, ref)
    assert int(opt.schedule_index) == 12 - len(bad_steps)
    assert int(opt.state[ours[0].weight]["step"]) == 12 - len(bad_steps)


def test_found_inf_is_honoured_when_grad_scale_is_none() -> None:
    """The attribute contract (pytorch#95781): found_inf must skip even with grad_scale None."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = fusedlr.AdamW([p], backend="torch")
    p.grad = torch.ones(3)
    opt.grad_scale = None
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(p, torch.ones(3))
    assert int(opt.state[p]["step"]) == 0
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(p, torch.ones(3))


# ---------------------------------------------------------------- checkpoints
def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for i in steps:
        opt.zero_grad()
        loss_of(model, i).backward()
        opt.step()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trips_with_torch_both_ways(amsgrad: bool) -> None:
    a, b = make_model(), make_model()
    fopt = fusedlr.AdamW(groups(a, 1e-2), lr=1e-2, amsgrad=amsgrad, backend="torch")
    topt = torch.optim.AdamW(groups(b, 1e-2), lr=1e-2, amsgrad=amsgrad)
    _train(a, fopt, range(4))
    _train(b, topt, range(4))

    # fusedlr -> torch: continue in torch and compare with torch continuing its own state
    buf = io.BytesIO()
    torch.save(fopt.state_dict(), buf)
    buf.seek(0)
    b2 = copy.deepcopy(a)
    topt2 = torch.optim.AdamW(groups(b2, 1e-2), lr=1e-2, amsgrad=amsgrad)
    topt2.load_state_dict(torch.load(buf))
    _train(b2, topt2, range(4, 8))
    _train(b, topt, range(4, 8))
    assert_same_params(b2, b)

    # torch -> fusedlr
    a2 = copy.deepcopy(b)
    fopt2 = fusedlr.AdamW(groups(a2, 1e-2), lr=1e-2, amsgrad=amsgrad, backend="torch")
    fopt2.load_state_dict(copy.deepcopy(topt.state_dict()))
    assert int(fopt2.schedule_index) == 8
    for p in a2.parameters():
        assert fopt2.state[p]["step"].dtype == torch.int64
    _train(a2, fopt2, range(8, 12))
    _train(b, topt, range(8, 12))
    assert_same_params(a2, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_identical(dtype: torch.dtype) -> None:
    model = make_model(dtype=dtype)
    opt = fusedlr.AdamW(groups(model, 1e-2), lr=1e-2, schedule=SCHED, max_grad_norm=0.3, backend="torch")
    _train(model, opt, range(5))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, range(5, 10))

    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = make_model(seed=123, dtype=dtype)
    resumed.load_state_dict(ckpt["model"])
    ropt = fusedlr.AdamW(groups(resumed, 1e-2), lr=1e-2, schedule=SCHED, max_grad_norm=0.3, backend="torch")
    ropt.load_state_dict(ckpt["opt"])
    _train(resumed, ropt, range(5, 10))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ropt.state[q][key])
            assert ropt.state[q][key].dtype == torch.float32
    assert int(ropt.schedule_index) == 10


def test_state_dict_step_is_a_copy() -> None:
    model = make_model()
    opt = fusedlr.AdamW(model.parameters(), backend="torch")
    _train(model, opt, range(1))
    sd = opt.state_dict()
    _train(model, opt, range(1, 2))
    assert float(sd["state"][0]["step"]) == 1.0


def test_step_counter_is_int64_and_keeps_counting_past_2_pow_24() -> None:
    """A float32 counter freezes at 2**24 (torchao#4915); ours is int64 and the update uses the true t."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    lr, b1, b2, eps = 1e-3, 0.9, 1 - 1e-8, 1e-8
    opt = fusedlr.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0, backend="torch")
    p.grad = torch.full((4,), 0.5, dtype=torch.float64)
    opt.step()
    assert opt.state[p]["step"].dtype == torch.int64
    for t in (2**24 + 1, 2**24 + 2):
        opt.state[p]["step"].fill_(t - 1)
        opt.state[p]["exp_avg"].zero_()
        opt.state[p]["exp_avg_sq"].zero_()
        before = p.detach().clone()
        opt.step()
        assert int(opt.state[p]["step"]) == t
        m, v = (1 - b1) * 0.5, (1 - b2) * 0.25
        expected = before - lr / (1 - b1**t) * m / (math.sqrt(v) / math.sqrt(1 - b2**t) + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"lr": torch.tensor(-0.1)}, "Invalid learning rate"),
        ({"lr": torch.ones(2)}, "one-element"),
        ({"betas": (1.0, 0.9)}, "index 0"),
        ({"betas": (0.9, -0.1)}, "index 1"),
        ({"eps": -1e-8}, "epsilon"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"schedule": "cosine"}, "schedule"),
        ({"backend": "jax"}, "backend"),
    ],
)
def test_bad_hyperparameters_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fusedlr.AdamW([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_sparse_gradient_raises_before_anything_changes() -> None:
    dense = torch.nn.Parameter(torch.ones(3))
    emb = torch.nn.Embedding(4, 2, sparse=True)
    opt = fusedlr.AdamW([dense, *emb.parameters()], backend="torch")
    dense.grad = torch.ones(3)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(dense, torch.ones(3)) and len(opt.state) == 0


def test_complex_parameter_raises() -> None:
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    opt = fusedlr.AdamW([p], backend="torch")
    p.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


def test_unavailable_backend_names_the_fix() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = fusedlr.AdamW([p], backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        opt.step()


def test_no_grads_is_a_no_op_and_closure_is_called() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = fusedlr.AdamW([p], backend="torch")
    assert opt.step(lambda: 4.0) == 4.0
    assert torch.equal(p, torch.ones(3))


def test_scheduled_lr_reports_the_next_updates_lr() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = fusedlr.AdamW([p], lr=0.5, schedule=SCHED, backend="torch")
    for k in range(6):
        assert float(opt.scheduled_lr()) == pytest.approx(0.5 * SCHED(k))
        p.grad = torch.ones(3)
        opt.step()
    assert math.isclose(float(opt.scheduled_lr()), 0.5 * SCHED(6))


def test_a_sparse_gradient_appearing_later_is_still_refused() -> None:
    p = torch.nn.Parameter(torch.ones(4, 2))
    opt = fusedlr.AdamW([p], backend="torch")
    p.grad = torch.ones(4, 2)
    opt.step()
    p.grad = torch.ones(4, 2).to_sparse()
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(p, before)


def test_add_param_group_after_training_starts() -> None:
    ours, ref = make_model(), make_model()
    opt = fusedlr.AdamW(list(ours[0].parameters()), lr=1e-2, backend="torch")
    topt = torch.optim.AdamW(list(ref[0].parameters()), lr=1e-2)
    for i in range(6):
        if i == 3:
            opt.add_param_group({"params": list(ours[2].parameters()) + list(ours[4].parameters()), "lr": 5e-3})
            topt.add_param_group({"params": list(ref[2].parameters()) + list(ref[4].parameters()), "lr": 5e-3})
        for m, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            loss_of(m, i).backward()
            o.step()
        assert_same_params(ours, ref)


def _cpu_backends() -> list[str]:
    """The reference and, when built, the compiled CPU kernel. (Not Triton: importing it here, outside
    its interpreter set-up in test_triton_backend.py, would make that module skip itself.)"""
    from fusedlr import backends

    try:
        backends.resolve("cpu", DEV)
    except RuntimeError:
        return ["torch"]
    return ["torch", "cpu"]


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad_norm_of_half_precision_grads_accumulates_in_fp32(backend: str, dtype: torch.dtype) -> None:
    """Squares of 1000 overflow fp16 (max 65504): the norm must come out finite and exact."""
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n in (3000, 17, 1)]
    for p in params:
        p.grad = torch.full_like(p, 1000.0)
    opt = fusedlr.AdamW(params, max_grad_norm=1.0, backend=backend)
    opt.step()
    expected = 1000.0 * math.sqrt(3000 + 17 + 1)
    assert opt.grad_norm.dtype == torch.float32
    assert float(opt.grad_norm) == pytest.approx(expected, rel=1e-6)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params_follow_fp32_math_rounded_once(dtype: torch.dtype) -> None:
    """One update of an fp16/bf16 param is the fp32 update of its value, rounded once to the param dtype."""
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(257).to(dtype))
    q = torch.nn.Parameter(p.detach().float())
    g = torch.randn(257).to(dtype)
    p.grad, q.grad = g, g.float()
    fusedlr.AdamW([p], lr=1e-2, backend="torch").step()
    torch.optim.AdamW([q], lr=1e-2).step()
    torch.testing.assert_close(p.detach(), q.detach().to(dtype), rtol=0, atol=0)


def test_state_of_another_shape_is_refused_not_misread() -> None:
    """Moments that do not lie over their parameter (a checkpoint of another model) raise clearly."""
    other = torch.nn.Parameter(torch.ones(5))
    src = fusedlr.AdamW([other], backend="torch")
    other.grad = torch.ones(5)
    src.step()
    p = torch.nn.Parameter(torch.ones(4))
    opt = fusedlr.AdamW([p], backend="torch")
    opt.load_state_dict(src.state_dict())
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="does not match its parameter"):
        opt.step()
    assert torch.equal(p, torch.ones(4))
