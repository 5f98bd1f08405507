"""Low-precision modes of fusedlr.AdamW (fp32 master weights, 16-bit remainders, stochastic rounding,
bf16 moments), against fp32 AdamW (fusedlr's and torch's) and against the bit-level spec written
independently here with Python integers."""

from __future__ import annotations

import copy
import io
import math
import pickle
import struct
import warnings

import pytest
import torch

import fusedlr
from fusedlr import precision

SCHED = fusedlr.get_schedule("cosine", num_warmup_steps=3, num_training_steps=40)


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))
    return model.to(dtype)


def set_grads(models: list[torch.nn.Module], step: int) -> None:
    """The same gradient (a bf16 model's, exactly representable in every dtype) for every model."""
    lead = models[0]
    lead.zero_grad()
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    p0 = next(lead.parameters())
    ((lead(x.to(p0.dtype)) - y.to(p0.dtype)) ** 2).float().mean().backward()
    for m in models[1:]:
        for p, q in zip(lead.parameters(), m.parameters()):
            q.grad = p.grad.to(q.dtype)


def optimizer(model: torch.nn.Module, **kwargs) -> fusedlr.AdamW:
    args = dict(lr=3e-2, weight_decay=0.1, schedule=SCHED, max_grad_norm=0.5, backend="torch")
    return fusedlr.AdamW(model.parameters(), **{**args, **kwargs})


# ------------------------------------------------------------------------------ bit-level spec
def py_hash32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def test_hash_and_random_bits_follow_the_documented_formula() -> None:
    xs = torch.tensor([0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789], dtype=torch.int64)
    assert precision.hash32(xs).tolist() == [py_hash32(int(x)) for x in xs]
    seed, pid, step = 987654321, 7, 2**33 + 5
    key = precision.tensor_keys(seed, torch.tensor([pid]), torch.tensor([step]))[0]
    expected_key = py_hash32(py_hash32(py_hash32(py_hash32(seed) ^ pid) ^ (step & 0xFFFFFFFF)) ^ (step >> 32))
    assert int(key) == expected_key
    index = torch.tensor([0, 1, 2**32 + 3, 2**40 + 2**31], dtype=torch.int64)
    r = precision.random_bits(key, precision.Streams.EXP_AVG_SQ, index)
    ka = py_hash32(expected_key ^ 2)
    kb = py_hash32(ka ^ 0x9E3779B9)
    expected = [py_hash32(((py_hash32((i & 0xFFFFFFFF) ^ ka) ^ kb) + (i >> 32)) & 0xFFFFFFFF) for i in index.tolist()]
    assert r.tolist() == expected


def test_element_index_is_the_memory_offset() -> None:
    t = torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last)
    idx = precision.element_index(t)
    assert torch.equal(idx.flatten().sort().values, torch.arange(t.numel()))
    assert idx[1, 2, 3, 4] == 1 * t.stride(0) + 2 * t.stride(1) + 3 * t.stride(2) + 4 * t.stride(3)


def _special_values() -> torch.Tensor:
    highs = [0x0000, 0x0001, 0x3F80, 0x3F81, 0x7F7F, 0x7F80, 0x8000, 0xBF80, 0xFF7F, 0xFF80]
    highs = torch.tensor(highs, dtype=torch.int64)
    u = (highs[:, None] << 16) | torch.arange(0x10000, dtype=torch.int64)[None, :]
    sample = torch.arange(0, 2**32, 4099, dtype=torch.int64)
    u = torch.cat([u.flatten(), sample])
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).view(torch.float32)


def test_remainder_stores_the_fp32_master_exactly_and_the_param_is_its_nearest_bf16() -> None:
    master = _special_values()
    param, remainder = precision.split_master(master)
    assert param.dtype == torch.bfloat16 and remainder.dtype == torch.int16
    back = precision.join_master(param, remainder)
    nan = torch.isnan(master)
    assert torch.equal(back[~nan].view(torch.int32), master[~nan].view(torch.int32))
    assert torch.isnan(back[nan]).all() and torch.isnan(param[nan]).all()
    # The param is a nearest bf16 of the master: as near as round-to-nearest-even's choice.
    finite = torch.isfinite(master) & torch.isfinite(master.to(torch.bfloat16))
    err = (param[finite].double() - master[finite].double()).abs()
    err_rne = (master[finite].to(torch.bfloat16).double() - master[finite].double()).abs()
    assert torch.equal(err, err_rne)
    differs = param[finite].view(torch.int16) != master[finite].to(torch.bfloat16).view(torch.int16)
    lows = master[finite].view(torch.int32).to(torch.int64) & 0xFFFF
    assert bool((lows[differs] == 0x8000).all()), "only exact ties may round differently from RNE"


def test_stochastic_rounding_is_unbiased_and_matches_the_formula() -> None:
    torch.manual_seed(0)
    values = torch.randn(64) * torch.logspace(-20, 20, 64)
    n = 4096
    x = values.repeat_interleave(n)
    r = precision.random_bits(torch.tensor(42), precision.Streams.PARAM, torch.arange(x.numel()))
    y = precision.stochastic_round_bf16(x, r)
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    expect = ((u + (r >> 16)) & 0xFFFF0000)
    assert torch.equal(y.view(torch.int16).to(torch.int64) & 0xFFFF, expect >> 16)
    # x lies between its truncation ``low`` and the next bf16 away from zero ``high`` (one ulp apart) and
    # must round to ``high`` with probability q = (low 16 bits) / 2^16: the mean of n roundings has
    # standard error ulp * sqrt(q (1 - q) / n); allow 5 of them.
    u0 = u.view(64, n)[:, 0]
    low = torch.where(u0 >= 2**31, u0 - 2**32, u0).bitwise_and(-65536).to(torch.int32).view(torch.float32).double()
    high = (torch.where(u0 >= 2**31, u0 - 2**32, u0).bitwise_and(-65536) + 65536).to(torch.int32).view(torch.float32)
    ulp = (high.double() - low).abs()
    q = (u0 & 0xFFFF).double() / 65536
    mean = y.double().view(64, n).mean(1)
    assert bool(((mean - values.double()).abs() <= 5 * ulp * torch.sqrt(q * (1 - q) / n) + 1e-12 * ulp).all())
    nan = precision.stochastic_round_bf16(torch.tensor([math.nan, math.inf, -0.0]), torch.zeros(3, dtype=torch.int64))
    assert math.isnan(nan[0]) and nan[1] == math.inf and str(nan[2].item()) == "-0.0"


# ------------------------------------------------------------------------------ master weights
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("mode,dtype", [(True, torch.bfloat16), (True, torch.float16), ("remainder", torch.bfloat16)])
def test_master_follows_the_fp32_trajectory_bit_for_bit(mode: object, dtype: torch.dtype, amsgrad: bool) -> None:
    low, f32, ref = make_model(dtype), make_model(torch.float32), make_model(torch.float32)
    with torch.no_grad():  # every model starts from the same (low-precision) values
        for p, q, r in zip(low.parameters(), f32.parameters(), ref.parameters()):
            q.copy_(p.float())
            r.copy_(p.float())
    opt = optimizer(low, master_weights=mode, amsgrad=amsgrad)
    opt32 = optimizer(f32, amsgrad=amsgrad)
    topt = torch.optim.AdamW(ref.parameters(), lr=3e-2, weight_decay=0.1, amsgrad=amsgrad)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, SCHED)
    for step in range(12):
        set_grads([low, f32, ref], step)
        opt.step()
        opt32.step()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        topt.step()
        sched.step()
        for p, q, r in zip(low.parameters(), f32.parameters(), ref.parameters()):
            state = opt.state[p]
            if mode is True:
                master = state["master_param"]
                assert master.dtype == torch.float32 and "master_remainder" not in state
                assert torch.equal(p, master.to(dtype)), "the param is the master rounded to nearest"
            else:
                assert state["master_remainder"].dtype == torch.int16 and "master_param" not in state
                master = precision.join_master(p.detach(), state["master_remainder"])
                nearest = (master.to(dtype).double() - master.double()).abs()
                assert torch.equal((p.double() - master.double()).abs(), nearest), "the param is a nearest bf16"
            assert torch.equal(master, q), f"step {step}: the master left the fp32 trajectory"
            torch.testing.assert_close(master, r, rtol=2e-5, atol=2e-6)


def test_plain_rounding_loses_what_master_weights_keep() -> None:
    """The bug the modes fix: updates below half a bf16 ulp vanish with round-to-nearest."""
    results = {}
    for mode in (False, True):
        p = torch.nn.Parameter(torch.ones(256, dtype=torch.bfloat16))
        opt = fusedlr.AdamW([p], lr=1e-3, weight_decay=0.0, master_weights=mode, backend="torch")
        for _ in range(50):
            p.grad = torch.ones_like(p)
            opt.step()
        results[mode] = p.float().mean().item()
    assert results[False] == 1.0  # each ~1e-3 update is below half an ulp (2^-8) of 1.0
    assert abs(results[True] - (1.0 - 50e-3)) < 2.0**-7


# ------------------------------------------------------------------------------ stochastic rounding
def _sr_run(seed: int, steps: int, sr: bool, state_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = fusedlr.AdamW(
        [p], lr=1e-3, weight_decay=0.0, stochastic_rounding=sr, state_dtype=state_dtype, seed=seed, backend="torch"
    )
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        p.grad = (torch.rand(4096, generator=g) + 0.5).to(torch.bfloat16)
        opt.step()
    return p.detach().clone(), opt.state[p]


def test_stochastic_rounding_accumulates_tiny_updates_unbiased() -> None:
    ref = torch.ones(4096, dtype=torch.float32, requires_grad=True)
    topt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(5)
    for _ in range(60):
        ref.grad = (torch.rand(4096, generator=g) + 0.5).to(torch.bfloat16).float()
        topt.step()
    nearest, _ = _sr_run(0, 60, sr=False)
    rounded, _ = _sr_run(0, 60, sr=True)
    assert torch.equal(nearest, torch.ones_like(nearest)), "round-to-nearest loses every update"
    # The grads do not depend on the param, so each element's error is a sum of 60 independent
    # zero-mean rounding errors, each at most one ulp (2^-8 below 1.0) wide: variance <= 60 ulp^2 / 4.
    err = rounded.double() - ref.detach().double()
    sd = 2.0**-8 * math.sqrt(60) / 2
    assert err.square().mean().sqrt() <= sd
    assert abs(err.mean().item()) < 5 * sd / math.sqrt(4096), "stochastic rounding is biased"
    assert 1.0 - ref.detach().double().mean().item() > 40 * sd / math.sqrt(4096), "the drift must dwarf the noise"


def test_stochastic_rounding_is_reproducible_and_seeded() -> None:
    a, sa = _sr_run(3, 10, sr=True, state_dtype=torch.bfloat16)
    b, sb = _sr_run(3, 10, sr=True, state_dtype=torch.bfloat16)
    c, _ = _sr_run(4, 10, sr=True, state_dtype=torch.bfloat16)
    assert torch.equal(a, b)
    assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert not torch.equal(a, c)


def test_bf16_moments_halve_the_state_and_track_fp32_moments() -> None:
    low, f32 = make_model(torch.float32), make_model(torch.float32)
    for sr in (False, True):
        opt = optimizer(low, state_dtype=torch.bfloat16, stochastic_rounding=sr)
        opt32 = optimizer(f32)
        for step in range(8):
            set_grads([low, f32], step)
            opt.step()
            opt32.step()
        for p, q in zip(low.parameters(), f32.parameters()):
            for key in ("exp_avg", "exp_avg_sq"):
                assert opt.state[p][key].dtype == torch.bfloat16
                exact = opt32.state[q][key]
                assert (opt.state[p][key].float() - exact).abs().max() <= 2e-2 * exact.abs().max(), (sr, key)
            torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------------------------ checkpoints
MODES = [
    dict(master_weights=True),
    dict(master_weights="remainder"),
    dict(stochastic_rounding=True, state_dtype=torch.bfloat16),
    dict(master_weights="remainder", stochastic_rounding=True, state_dtype=torch.bfloat16, amsgrad=True),
]


@pytest.mark.parametrize("kwargs", MODES)
def test_resume_is_exact_and_new_keys_round_trip(kwargs: dict) -> None:
    straight, resumed = make_model(torch.bfloat16), make_model(torch.bfloat16)
    opt = optimizer(straight, seed=11, **kwargs)
    for step in range(5):
        set_grads([straight], step)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": straight.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed.load_state_dict(saved["model"])
    ropt = optimizer(resumed, **kwargs)  # another seed: the checkpoint's wins
    ropt.load_state_dict(saved["opt"])
    for p, q in zip(straight.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(ropt.state[q][key].to(value.dtype), value) and ropt.state[q][key].dtype == value.dtype
    for step in range(5, 10):
        set_grads([straight, resumed], step)
        opt.step()
        ropt.step()
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], ropt.state[q][key]), key


def test_torch_adamw_loads_the_state_dict_and_a_plain_one_starts_the_master_from_the_param() -> None:
    model = make_model(torch.bfloat16)
    opt = optimizer(model, master_weights=True, state_dtype=torch.bfloat16)
    for step in range(3):
        set_grads([model], step)
        opt.step()
    sd = opt.state_dict()
    assert "master_param" in sd["state"][0] and sd["param_groups"][0]["master_weights"] is True
    tmodel = make_model(torch.bfloat16)
    topt = torch.optim.AdamW(tmodel.parameters(), lr=3e-2)
    topt.load_state_dict(copy.deepcopy(sd))
    first = next(tmodel.parameters())
    assert torch.equal(topt.state[first]["exp_avg"], sd["state"][0]["exp_avg"].to(first.dtype))
    set_grads([tmodel], 3)
    topt.step()  # the extra keys ride along unused
    assert int(topt.state[first]["step"]) == 4 and torch.isfinite(first).all()

    assert "master_param" in topt.state_dict()["state"][0]  # carried along
    pmodel = make_model(torch.bfloat16)
    popt = torch.optim.AdamW(pmodel.parameters(), lr=3e-2)
    set_grads([pmodel], 0)
    popt.step()
    plain = popt.state_dict()
    mmodel = make_model(torch.bfloat16)
    mopt = optimizer(mmodel, master_weights=True)
    mopt.load_state_dict(plain)
    assert mopt.param_groups[0]["master_weights"] is True
    set_grads([mmodel], 4)
    before = [p.detach().clone() for p in mmodel.parameters()]
    mopt.step()
    f32 = [p.float().requires_grad_() for p in before]
    ref = fusedlr.AdamW(f32, lr=3e-2, weight_decay=0.1, schedule=SCHED, max_grad_norm=0.5, backend="torch")
    ref.load_state_dict(plain)
    for p, q in zip(mmodel.parameters(), f32):
        q.grad = p.grad.float()
    ref.step()
    for p, q in zip(mmodel.parameters(), f32):
        assert torch.equal(mopt.state[p]["master_param"], q), "the master must start as the param's value"


def test_a_master_checkpoint_loads_into_remainder_mode_exactly() -> None:
    a, b = make_model(torch.bfloat16), make_model(torch.bfloat16)
    opt = optimizer(a, master_weights=True)
    for step in range(4):
        set_grads([a], step)
        opt.step()
    ropt = optimizer(b, master_weights="remainder")
    ropt.load_state_dict(opt.state_dict())
    set_grads([a, b], 4)
    opt.step()
    ropt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        joined = precision.join_master(q.detach(), ropt.state[q]["master_remainder"])
        assert torch.equal(opt.state[p]["master_param"], joined)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_skipped_step_changes_no_master_remainder_or_rounded_state(amsgrad: bool) -> None:
    """Also with amsgrad: stochastically rounded, a stored exp_avg_sq may exceed its stored max_exp_avg_sq."""
    model = make_model(torch.bfloat16)
    opt = optimizer(model, master_weights="remainder", stochastic_rounding=True, state_dtype=torch.bfloat16,
                    amsgrad=amsgrad)
    set_grads([model], 0)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    set_grads([model], 1)
    next(model.parameters()).grad[0, 0] = math.inf
    opt.grad_scale = torch.tensor(2.0)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for i, s in opt.state_dict()["state"].items():
        for key, value in s.items():
            assert torch.equal(value, before["state"][i][key]), key


def test_deepcopy_and_pickle_keep_the_modes() -> None:
    model = make_model(torch.bfloat16)
    opt = optimizer(model, master_weights="remainder", seed=9)
    set_grads([model], 0)
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.seed == 9 and clone.param_groups[0]["master_weights"] == "remainder"


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "dtype,kwargs,match",
    [
        (torch.float32, dict(master_weights=True), "master_weights=True keeps an fp32 copy"),
        (torch.float64, dict(master_weights="remainder"), "master_weights='remainder'"),
        (torch.float16, dict(master_weights="remainder"), "float16 is not the top half"),
        (torch.float32, dict(stochastic_rounding=True), "stochastic_rounding=True rounds bfloat16"),
        (torch.float16, dict(stochastic_rounding=True), "stochastic_rounding=True rounds bfloat16"),
    ],
)
def test_modes_that_cannot_apply_to_the_params_raise_before_anything_changes(dtype, kwargs, match) -> None:
    model = make_model(dtype)
    opt = optimizer(model, **kwargs)
    set_grads([model], 0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and len(opt.state) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(state_dtype=torch.float16), "state_dtype must be"),
        (dict(state_dtype="bf16"), "state_dtype must be"),
        (dict(master_weights="fp32"), "master_weights must be"),
        (dict(stochastic_rounding=1), "stochastic_rounding must be"),
        (dict(master_weights=True, stochastic_rounding=True), "nothing to round"),
        (dict(seed=-1), "seed must be"),
        (dict(seed=2**32), "seed must be"),
    ],
)
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fusedlr.AdamW(make_model(torch.bfloat16).parameters(), **kwargs)
    opt = fusedlr.AdamW(make_model(torch.bfloat16).parameters())
    if "seed" not in kwargs:
        with pytest.raises(ValueError, match=match):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))], **kwargs})
        assert len(opt.param_groups) == 1


def test_fp32_params_can_sit_beside_master_weights_in_their_own_group() -> None:
    w = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    norm = torch.nn.Parameter(torch.ones(8))
    groups = [{"params": [w]}, {"params": [norm], "master_weights": False}]
    opt = fusedlr.AdamW(groups, master_weights=True, backend="torch")
    w.grad, norm.grad = torch.ones_like(w), torch.ones_like(norm)
    opt.step()
    assert "master_param" in opt.state[w] and "master_param" not in opt.state[norm]


def _compiled_cpu() -> list[str]:
    """The compiled CPU backend when it is built (the Triton one is covered by test_triton_backend.py's set-up)."""
    from fusedlr import backends

    try:
        backends.resolve("cpu", torch.device("cpu"))
    except RuntimeError:
        return []
    return ["cpu"]


@pytest.mark.parametrize("backend", _compiled_cpu())
def test_compiled_backend_runs_the_modes_itself(backend: str) -> None:
    """No hand-over to the reference (tests/test_precision_kernels.py compares the bits)."""
    from fusedlr import reference

    a, b = make_model(torch.bfloat16), make_model(torch.bfloat16)
    kwargs = dict(master_weights="remainder", stochastic_rounding=True, state_dtype=torch.bfloat16, amsgrad=True)
    opt, ref = optimizer(a, backend=backend, **kwargs), optimizer(b, **kwargs)
    calls = []
    original = reference.adamw_update
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("error")  # no "updated by the torch reference backend"
        mp.setattr(reference, "adamw_update", lambda *args, **kw: calls.append(1) or original(*args, **kw))
        for step in range(3):
            set_grads([a, b], step)
            opt.step()
        assert not calls, "the compiled backend handed a low-precision bucket to the reference"
        for step in range(3):
            set_grads([b], step)
            ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=2**-6, atol=1e-5)
        for key in opt.state[p]:
            assert opt.state[p][key].dtype == ref.state[q][key].dtype, key
