"""Lifecycle operations of a torch optimizer, done on fusedlr.AdamW and on torch.optim.AdamW side by side:
deepcopy, pickle, add_param_group mid-training, params moved to another dtype or device, meta params,
odd state entries, refused checkpoints, weights-only ``torch.load``, complex params, tensor ``lr``."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import fusedlr
from fusedlr import backends

SCHED = fusedlr.get_schedule("cosine", num_warmup_steps=3, num_training_steps=20)
MAX_NORM = 0.05


def make_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def grads_for(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


def set_grads(params: list[torch.Tensor], step: int) -> None:
    for p, g in zip(params, grads_for(params, step)):
        p.grad = g


def groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "lr": 3e-2, "betas": (0.8, 0.99)}]


class TorchRecipe:
    """torch.optim.AdamW + LambdaLR(schedule) + clip_grad_norm_: what fusedlr.AdamW(schedule, max_grad_norm) does."""

    def __init__(self, params: list[torch.Tensor], **kwargs) -> None:
        self.params = params
        self.opt = torch.optim.AdamW(groups(params), lr=1e-2, **kwargs)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, SCHED)

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM)
        self.opt.step()
        self.sched.step()


def make_fused(params: list[torch.Tensor], backend: str = "torch", **kwargs) -> fusedlr.AdamW:
    return fusedlr.AdamW(groups(params), lr=1e-2, schedule=SCHED, max_grad_norm=MAX_NORM, backend=backend, **kwargs)


def train(params: list[torch.Tensor], opt, steps: range) -> None:
    for i in steps:
        set_grads(params, i)
        opt.step()


def snapshot(opt: fusedlr.AdamW) -> dict:
    """Everything a step may change, copied: params, every state tensor, schedule index, grad norm."""
    return {
        "params": [p.detach().clone() for g in opt.param_groups for p in g["params"]],
        "state": {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                  for p, s in opt.state.items()},
        "k": opt.schedule_index.clone(),
        "grad_norm": opt.grad_norm.clone(),
    }


def assert_bitwise_equal(a, b) -> None:
    """Nested dicts/lists of tensors equal bit for bit (NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or bool(torch.isnan(a).all() and torch.isnan(b).all()), (a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_bitwise_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_bitwise_equal(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------ A: deepcopy and pickle
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_copy_continues_exactly_like_the_original(how: str, amsgrad: bool) -> None:
    """A copy keeps schedule, max_grad_norm, backend and schedule index, and continues as the original does."""
    params = make_params()
    opt = make_fused(params, amsgrad=amsgrad)
    train(params, opt, range(5))
    if how == "deepcopy":
        twin = copy.deepcopy({"params": params, "opt": opt})
    else:
        twin = pickle.loads(pickle.dumps({"params": params, "opt": opt}))
    params2, opt2 = twin["params"], twin["opt"]
    assert opt2.schedule is not None and opt2.max_grad_norm == MAX_NORM and opt2.backend == "torch"
    assert int(opt2.schedule_index) == 5
    train(params, opt, range(5, 12))
    train(params2, opt2, range(5, 12))
    assert_bitwise_equal([p.detach() for p in params], [p.detach() for p in params2])
    assert_bitwise_equal([opt.state[p] for p in params], [opt2.state[p] for p in params2])
    assert int(opt2.schedule_index) == int(opt.schedule_index) == 12


def test_copy_keeps_attributes_added_later() -> None:
    """deepcopy/pickle copy every attribute the optimizer has (a subclass's or a newer version's too)."""
    params = make_params()
    opt = make_fused(params)
    opt.my_setting = {"a": 1}
    assert copy.deepcopy(opt).my_setting == {"a": 1}
    assert pickle.loads(pickle.dumps(opt)).my_setting == {"a": 1}


def test_deepcopy_of_a_fresh_optimizer_matches_torch_recipe() -> None:
    params, ref = make_params(), make_params()
    opt = copy.deepcopy({"p": params, "o": make_fused(params)})
    recipe = TorchRecipe(ref)
    train(opt["p"], opt["o"], range(6))
    train(ref, recipe, range(6))
    for a, b in zip(opt["p"], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ E: meta params
def test_state_dict_of_meta_params() -> None:
    """Meta params (a model built on the meta device before materialising): state_dict as torch's."""
    params = [torch.nn.Parameter(torch.empty(3, 2, device="meta"))]
    opt = fusedlr.AdamW(params, schedule=SCHED)
    topt = torch.optim.AdamW([torch.nn.Parameter(torch.empty(3, 2, device="meta"))])
    sd, tsd = opt.state_dict(), topt.state_dict()
    assert sd["state"] == tsd["state"] == {}
    assert sd["param_groups"][0]["params"] == tsd["param_groups"][0]["params"]


def test_meta_to_cpu_then_load_a_real_checkpoint() -> None:
    """cpu -> meta -> cpu: an optimizer made over meta params, materialised, loads a checkpoint and continues."""
    params = make_params()
    opt = make_fused(params)
    train(params, opt, range(4))
    sd = copy.deepcopy(opt.state_dict())
    saved = [p.detach().clone() for p in params]

    with torch.device("meta"):
        meta = make_params()
    opt2 = make_fused(meta)
    meta_sd = opt2.state_dict()
    assert meta_sd["state"] == {}
    fresh = make_fused(make_params())
    fresh.load_state_dict(meta_sd)  # a meta optimizer's state dict loads into a real one
    assert int(fresh.schedule_index) == 0 and len(fresh.state) == 0
    real = [torch.nn.Parameter(torch.empty_like(p, device="cpu")) for p in meta]
    for r, s in zip(real, saved):
        r.data.copy_(s)
    opt2 = make_fused(real)
    opt2.load_state_dict(sd)
    train(params, opt, range(4, 8))
    train(real, opt2, range(4, 8))
    assert_bitwise_equal([p.detach() for p in params], [p.detach() for p in real])


# ------------------------------------------------------------------ F: a param twice in one group
def test_param_twice_in_one_group_is_refused() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="more than once"):
        fusedlr.AdamW([p, p])
    opt = fusedlr.AdamW([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check, kept
        fusedlr.AdamW([{"params": [p]}, {"params": [p]}])


# ------------------------------------------------------------------ G: wrong-shaped moments refused at load
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_load_of_wrong_shaped_moments_is_refused_and_changes_nothing(key: str) -> None:
    params = make_params()
    opt = make_fused(params, amsgrad=True)
    train(params, opt, range(3))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1][key] = torch.zeros(4)  # param 1 has shape (3,)
    sd["fusedlr"]["schedule_index"] = 0
    before = snapshot(opt)
    with pytest.raises(ValueError, match=f"'{key}'.*parameter 1"):
        opt.load_state_dict(sd)
    assert_bitwise_equal(snapshot(opt), before)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 3e-2]


def test_load_of_a_non_tensor_moment_is_refused() -> None:
    params = make_params()
    opt = make_fused(params)
    train(params, opt, range(2))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"] = [0.0] * 12
    with pytest.raises(ValueError, match="'exp_avg'.*parameter 0"):
        opt.load_state_dict(sd)


# ------------------------------------------------------------------ H: non-parameter entries in state
def test_non_parameter_state_entries_are_kept_both_ways() -> None:
    params, tparams = make_params(), make_params()
    opt, topt = make_fused(params), torch.optim.AdamW(groups(tparams), lr=1e-2)
    train(params, opt, range(2))
    train(tparams, topt, range(2))
    opt.state["extra"] = 1
    topt.state["extra"] = 1
    sd, tsd = opt.state_dict(), topt.state_dict()
    assert sd["state"]["extra"] == tsd["state"]["extra"] == 1
    fresh = make_fused(make_params())
    fresh.load_state_dict(tsd)  # a torch AdamW state dict carrying the key
    assert fresh.state["extra"] == 1
    tfresh = torch.optim.AdamW(groups(make_params()), lr=1e-2)
    tfresh.load_state_dict(sd)
    assert tfresh.state["extra"] == 1
    fresh.state_dict()  # and it saves again


def test_state_dict_pre_hook_may_add_an_entry() -> None:
    params = make_params()
    opt = make_fused(params)
    train(params, opt, range(1))
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("note", "hi"))
    assert opt.state_dict()["state"]["note"] == "hi"


# ------------------------------------------------------------------ the rest of the lifecycle, against torch
CPU_BACKENDS = [name for name in ("torch", "cpu") if backends.unavailable(name, torch.device("cpu")) is None]


def assert_close_params(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-5, atol=1e-7)


def test_add_param_group_mid_training_matches_torch() -> None:
    params, ref = make_params(), make_params()
    extra, textra = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    opt, topt = fusedlr.AdamW(params, lr=1e-2, backend="torch"), torch.optim.AdamW(ref, lr=1e-2)
    train(params, opt, range(3))
    train(ref, topt, range(3))
    opt.add_param_group({"params": [extra], "lr": 5e-2, "amsgrad": True})
    topt.add_param_group({"params": [textra], "lr": 5e-2, "amsgrad": True})
    train(params + [extra], opt, range(3, 7))
    train(ref + [textra], topt, range(3, 7))
    assert_close_params(params + [extra], ref + [textra])
    assert int(opt.state[extra]["step"]) == 4 and int(opt.state[params[0]]["step"]) == 7


@pytest.mark.parametrize("target", [torch.float64, "meta-and-back"])
def test_params_moved_then_state_reloaded_matches_torch(target) -> None:
    """model.to(...) after training starts, then load_state_dict (torch's way of moving an optimizer)."""
    mods = [torch.nn.Linear(3, 2) for _ in range(2)]
    mods[1].load_state_dict(mods[0].state_dict())
    opt = fusedlr.AdamW(mods[0].parameters(), lr=1e-2, backend="torch")
    topt = torch.optim.AdamW(mods[1].parameters(), lr=1e-2)
    for m, o in zip(mods, (opt, topt)):
        train(list(m.parameters()), o, range(3))
        sd = copy.deepcopy(o.state_dict())
        if target == "meta-and-back":
            m.to("meta")
            m.to_empty(device="cpu")
        else:
            m.to(target)
        o.load_state_dict(sd)
    if target == "meta-and-back":  # to_empty leaves garbage: give both the same weights
        mods[1].load_state_dict(mods[0].state_dict())
    for m, o in zip(mods, (opt, topt)):
        train(list(m.parameters()), o, range(3, 6))
    assert_close_params(list(mods[0].parameters()), list(mods[1].parameters()))
    if target == torch.float64:
        assert opt.state[mods[0].weight]["exp_avg"].dtype == torch.float64


def test_weights_only_torch_load_of_the_state_dict(tmp_path) -> None:
    params = make_params()
    opt = make_fused(params, amsgrad=True)
    opt.param_groups[1]["lr"] = torch.tensor(3e-2)
    train(params, opt, range(3))
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make_fused(params2, amsgrad=True)
    opt2.load_state_dict(loaded)
    train(params, opt, range(3, 6))
    train(params2, opt2, range(3, 6))
    assert_bitwise_equal([p.detach() for p in params], [p.detach() for p in params2])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_params_match_torch(backend: str, dtype: torch.dtype) -> None:
    """Complex params are updated as torch's AdamW does: through view_as_real of param, grad and moments."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=g, dtype=dtype), torch.randn(5, generator=g, dtype=dtype),
            torch.randn(2, generator=g)]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt = fusedlr.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True, max_grad_norm=0.5, backend=backend)
    topt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, amsgrad=True)
    for i in range(5):
        set_grads(params, i)
        set_grads(ref, i)
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        topt.step()
        torch.testing.assert_close(opt.grad_norm.double(), norm.double(), rtol=1e-6, atol=0)
    tol = dict(rtol=1e-5, atol=1e-7)  # the global norm accumulates in float32, complex128 too
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), **tol)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert opt.state[p][key].dtype == topt.state[r][key].dtype
            torch.testing.assert_close(opt.state[p][key], topt.state[r][key], **tol)
    fresh = torch.optim.AdamW([torch.nn.Parameter(t.clone()) for t in init], lr=1e-2, weight_decay=0.1, amsgrad=True)
    fresh.load_state_dict(opt.state_dict())  # loads into torch, and torch's into ours
    opt.load_state_dict(topt.state_dict())


def test_complex_state_for_a_real_param_is_refused_at_load() -> None:
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    opt = fusedlr.AdamW([p], backend="torch")
    p.grad = torch.ones(3, dtype=torch.complex64)
    opt.step()
    with pytest.raises(ValueError, match="complex64, its parameter torch.float32"):
        fusedlr.AdamW([torch.nn.Parameter(torch.ones(3))]).load_state_dict(opt.state_dict())


def test_tensor_lr_matches_torch_and_is_read_at_each_step() -> None:
    """A 0-d tensor lr, filled in place between steps (what a host scheduler does under CUDA graphs)."""
    params, ref = make_params(), make_params()
    lr, tlr = torch.tensor(1e-2), torch.tensor(1e-2)
    opt = fusedlr.AdamW(params, lr=lr, weight_decay=0.1, backend="torch")
    topt = torch.optim.AdamW(ref, lr=tlr, weight_decay=0.1)
    assert opt.param_groups[0]["lr"] is lr
    for i in range(6):
        lr.fill_(1e-2 * (i + 1))
        tlr.fill_(1e-2 * (i + 1))
        torch.testing.assert_close(opt.scheduled_lr(), lr.double())
        train(params, opt, range(i, i + 1))
        train(ref, topt, range(i, i + 1))
    assert_close_params(params, ref)
    sd = opt.state_dict()
    assert isinstance(sd["param_groups"][0]["lr"], torch.Tensor)
    topt2 = torch.optim.AdamW(make_params(), lr=torch.tensor(0.5))
    topt2.load_state_dict(sd)
    torch.testing.assert_close(topt2.param_groups[0]["lr"], lr)


def test_tensor_lr_with_a_schedule_is_the_peak() -> None:
    params = make_params()
    opt = fusedlr.AdamW(params, lr=torch.tensor(2e-2), schedule=SCHED, backend="torch")
    train(params, opt, range(2))
    torch.testing.assert_close(opt.scheduled_lr(), torch.tensor(2e-2, dtype=torch.float64).float().double() * SCHED(2))
