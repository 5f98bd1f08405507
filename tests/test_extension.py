"""The compiled backends (``backend="cpu"``, ``backend="cuda"``, from ``fusedlr._C``) against the
reference (``backend="torch"``): every state tensor after every step.

Devices: "cpu" runs wherever ``fusedlr._C`` is built (``pip install --no-build-isolation -e .``);
"cuda" needs a GPU and a CUDA build of the extension; "emu" needs only g++ and the CUDA headers: it
runs the __global__ kernels themselves, launched by their own launchers with a real grid, on the host
(csrc/cuda/testing/cuda_shim.h, tests/cuda_on_host.py; CPU tensors), so their indexing, block
reductions, barriers and math are checked without a GPU (tests/test_machine_code.py compiles every
csrc/cuda/*.cu as shipped).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import fusedlr
from fusedlr import extension, reference
from fusedlr.bucket import Bucket
from fusedlr.control import GroupHyper, StepControl
from schedule_cases import torch_kind_schedules

from cuda_on_host import EmulatedCudaBackend, cuda_include, fusedlr_kernels

ROOT = Path(__file__).resolve().parents[1]

needs_ext = pytest.mark.skipif(extension.load_error() is not None, reason=str(extension.load_error()))
pytestmark = [pytest.mark.filterwarnings("ignore:GradScaler is going to stop:FutureWarning")]

_CUDA_SKIP = None
if not torch.cuda.is_available():
    _CUDA_SKIP = "no CUDA device (torch.cuda.is_available() is False)"
elif extension.load_error() is not None:
    _CUDA_SKIP = str(extension.load_error())
elif not extension.has_kernel("cuda"):
    _CUDA_SKIP = (
        "fusedlr._C was built without CUDA kernels (FUSEDLR_BUILD_CUDA=1 pip install --no-build-isolation -e .)"
    )
needs_cuda = pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))

DEVICES = [
    pytest.param("cpu", marks=needs_ext),
    pytest.param("cuda", marks=[needs_ext, needs_cuda, pytest.mark.gpu]),
]


needs_host_cuda = pytest.mark.skipif(cuda_include() is None, reason="no CUDA headers (nvcc on PATH)")
# "emu": the CUDA kernels themselves run on the host by csrc/cuda/testing/cuda_shim.h, on CPU tensors.
DEVICES_EMU = DEVICES + [pytest.param("emu", marks=needs_host_cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]

# Parameter tolerance per dtype: low-precision params may differ by one rounding (the reference's
# CPU lerp uses FMA); states are float32/float64 and compared tightly.
PARAM_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-9, atol=1e-5),
}
STATE_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.float64: dict(rtol=1e-10, atol=1e-14)}


def backend_for(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


def tdev(device: str) -> str:
    """Where the tensors of a test on ``device`` live."""
    return "cpu" if device == "emu" else device


def make_opt(params, device, **kw) -> fusedlr.AdamW:
    """A fusedlr.AdamW on the backend under test (for "emu": the host emulation of the CUDA kernels)."""
    if device != "emu":
        return fusedlr.AdamW(params, backend=backend_for(device), **kw)
    opt = fusedlr.AdamW(params, backend="torch", **kw)
    opt._step_cache.update(impl=emulated_cuda_backend(), impl_device=torch.device("cpu"))
    return opt


def emulated_cuda_backend(grid: int = 3, seed: int = 0) -> EmulatedCudaBackend:
    """A small grid (3 blocks) so that blocks walk several chunks and tensors (grid-stride)."""
    if cuda_include() is None:
        pytest.skip("no CUDA headers (nvcc on PATH): cannot build the CUDA kernels for the host")
    shim = fusedlr_kernels()
    shim.configure(seed)
    return EmulatedCudaBackend(shim, grid)


def make_params(sizes, dtype, device, seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in sizes:
        shape = s if isinstance(s, tuple) else (s,)
        out.append(torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)))
    return out


def set_grads(params, step, scale=1.0, seed=0) -> None:
    g = torch.Generator().manual_seed(10_000 * seed + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype).to(p.device)


def _tol(table: dict, dtype: torch.dtype, clipped: bool) -> dict:
    if clipped and dtype == torch.float64:
        # the clip coefficient comes from a float32 sum of squares (the spec), summed in another order
        return dict(rtol=2e-6, atol=1e-8)
    return table[dtype]


def assert_same_state(ref_opt, opt, ref_params, params, what="", check_norm=True) -> None:
    """Every parameter and every state tensor of ``opt`` equals ``ref_opt``'s."""
    assert len(ref_params) == len(params)
    clipped = ref_opt.max_grad_norm is not None
    for i, (pr, p) in enumerate(zip(ref_params, params)):
        torch.testing.assert_close(
            p.detach().cpu(),
            pr.detach().cpu(),
            **_tol(PARAM_TOL, p.dtype, clipped),
            msg=lambda m, i=i, p=p: f"{what} param {i} {tuple(p.shape)}: {m}",
        )
        sr, s = ref_opt.state[pr], opt.state[p]
        assert sorted(s) == sorted(sr), f"{what} param {i}: state keys {sorted(s)} != {sorted(sr)}"
        for key in sr:
            a, b = s[key].cpu(), sr[key].cpu()
            assert a.dtype == b.dtype, f"{what} param {i} {key}: dtype {a.dtype} != {b.dtype}"
            if key == "step":
                assert torch.equal(a, b), f"{what} param {i}: step {a} != {b}"
            else:
                torch.testing.assert_close(
                    a,
                    b,
                    **_tol(STATE_TOL, a.dtype, clipped),
                    msg=lambda m, i=i, key=key: f"{what} param {i} {key}: {m}",
                )
    if ref_opt.schedule_index is not None:
        assert int(opt.schedule_index) == int(ref_opt.schedule_index)
    if check_norm and ref_opt.grad_norm is not None:
        torch.testing.assert_close(opt.grad_norm.cpu(), ref_opt.grad_norm.cpu(), rtol=1e-5, atol=0, equal_nan=True)


def run_pair(device, sizes, dtype, steps=4, grad_scale=1.0, groups=None, **opt_kw):
    """Train two copies of the same params (reference and compiled backend) and compare after each step."""
    ref_params = make_params(sizes, dtype, tdev(device))
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]

    def build(ps, dev):
        arg = ps if groups is None else [dict(g, params=[ps[i] for i in g["params"]]) for g in groups]
        return fusedlr.AdamW(arg, backend="torch", **opt_kw) if dev is None else make_opt(arg, dev, **opt_kw)

    ref_opt, opt = build(ref_params, None), build(params, device)
    for step in range(steps):
        set_grads(ref_params, step, grad_scale)
        set_grads(params, step, grad_scale)
        ref_opt.step()
        opt.step()
        assert_same_state(ref_opt, opt, ref_params, params, what=f"step {step}:")
    assert opt._step_cache["impl"].NAME == ("cuda-emulated" if device == "emu" else backend_for(device))
    return ref_opt, opt, ref_params, params


SIZES = [0, 1, 7, 4097, (33, 65)]

CONFIGS = {
    "plain": dict(lr=1e-2, weight_decay=0.1),
    "no-wd": dict(lr=1e-2, weight_decay=0.0),
    "amsgrad": dict(lr=1e-2, weight_decay=0.05, amsgrad=True),
    "maximize": dict(lr=1e-2, maximize=True),
    "clip": dict(lr=1e-2, max_grad_norm=0.5),
    "clip-inactive": dict(lr=1e-2, max_grad_norm=1e6),
    "betas-eps": dict(lr=3e-3, betas=(0.5, 0.9), eps=1e-3, amsgrad=True, max_grad_norm=2.0),
    "schedule": dict(lr=1e-2, schedule=fusedlr.get_schedule("cosine", num_warmup_steps=2, num_training_steps=6)),
    "beta0": dict(lr=1e-2, betas=(0.0, 0.0)),
}


@pytest.mark.parametrize("device", DEVICES_EMU)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference(device, dtype, config) -> None:
    run_pair(device, SIZES, dtype, steps=4, **CONFIGS[config])


@pytest.mark.parametrize("device", DEVICES_EMU)
def test_many_small_tensors_and_large_ones(device) -> None:
    sizes = [int(s) for s in torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(3))]
    sizes += [0, 70_001, 0, (3, 0, 5), 1]
    run_pair(device, sizes, torch.float32, steps=3, lr=1e-2, max_grad_norm=5.0, amsgrad=True)


@pytest.mark.parametrize("device", DEVICES_EMU)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_unaligned_tensors(device, dtype) -> None:
    """Params and grads starting at odd element offsets (the CUDA kernels' scalar path)."""
    dev = tdev(device)
    g = torch.Generator().manual_seed(7)
    sizes = [3, 4101, 2 * 8192 + 5, 1]
    bases = [torch.randn(n + 1, generator=g, dtype=torch.float64).to(dtype).to(dev) for n in sizes]
    ref_params = [torch.nn.Parameter(b[1:].clone()) for b in bases]
    params = [torch.nn.Parameter(b[1:]) for b in bases]  # storage offset 1
    assert all(p.storage_offset() == 1 for p in params)
    kw = dict(lr=1e-2, amsgrad=True, max_grad_norm=3.0, weight_decay=0.1)
    ref_opt, opt = fusedlr.AdamW(ref_params, backend="torch", **kw), make_opt(params, device, **kw)
    for step in range(3):
        for pr, p in zip(ref_params, params):
            grad = torch.randn(p.numel() + 1, generator=g, dtype=torch.float64).to(dtype).to(dev)
            pr.grad, p.grad = grad[1:].clone(), grad[1:]
        ref_opt.step()
        opt.step()
        assert_same_state(ref_opt, opt, ref_params, params, what=f"step {step}:")


@pytest.mark.parametrize("device", DEVICES_EMU)
def test_large_bucket_runs_multithreaded(device) -> None:
    # Several chunks per tensor, enough elements for the parallel CPU path.
    run_pair(device, [300_000, 123_457, 65_536], torch.bfloat16, steps=2, lr=1e-3, max_grad_norm=10.0)


@pytest.mark.parametrize("device", DEVICES_EMU)
def test_param_groups(device) -> None:
    sizes = [16, 5, 300, 1, 9, 0, 64]
    groups = [
        {"params": [0, 1, 2], "weight_decay": 0.1},
        {"params": [3, 4, 5], "lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6, "amsgrad": True, "weight_decay": 0.0},
        {"params": [6], "maximize": True},
    ]
    sched = fusedlr.get_schedule("linear", num_warmup_steps=1, num_training_steps=8)
    run_pair(device, sizes, torch.float32, steps=5, groups=groups, lr=1e-2, schedule=sched, max_grad_norm=1.0)


@pytest.mark.parametrize("device", DEVICES_EMU)
def test_mixed_dtypes_in_one_group(device) -> None:
    ref_params = make_params([10, 20, 30, 40], torch.float32, tdev(device))
    for p, dt in zip(ref_params, DTYPES):
        p.data = p.data.to(dt)
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    ref_opt = fusedlr.AdamW(ref_params, lr=1e-2, max_grad_norm=1.0, backend="torch")
    opt = make_opt(params, device, lr=1e-2, max_grad_norm=1.0)
    for step in range(3):
        set_grads(ref_params, step)
        set_grads(params, step)
        ref_opt.step()
        opt.step()
        assert_same_state(ref_opt, opt, ref_params, params, what=f"step {step}:")


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_and_transposed_layouts_run_compiled(device) -> None:
    """Dense non-contiguous params (channels_last) are updated in place by the kernels; a grad laid out
    unlike its param is read through a copy."""
    torch.manual_seed(0)
    base = [torch.randn(4, 3, 5, 6).to(memory_format=torch.channels_last), torch.randn(7, 9)]
    ref_params = [torch.nn.Parameter(t.clone(memory_format=torch.preserve_format).to(device)) for t in base]
    params = [torch.nn.Parameter(t.clone(memory_format=torch.preserve_format).to(device)) for t in base]
    assert not params[0].is_contiguous()
    ref_opt = fusedlr.AdamW(ref_params, lr=1e-2, backend="torch")
    opt = fusedlr.AdamW(params, lr=1e-2, backend=backend_for(device))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
        for step in range(3):
            set_grads(ref_params, step)
            set_grads(params, step)
            params[1].grad = params[1].grad.t().contiguous().t()  # same values, transposed strides
            ref_opt.step()
            opt.step()
            assert_same_state(ref_opt, opt, ref_params, params, what=f"step {step}:")
    assert opt.state[params[0]]["exp_avg"].stride() == params[0].stride()


@pytest.mark.parametrize("device", DEVICES)
def test_non_dense_param_falls_back_to_reference(device) -> None:
    torch.manual_seed(0)
    strided = torch.randn(6, 10, device=device)[:, ::2]  # not dense: the kernels cannot update it in place
    params = [torch.nn.Parameter(strided), torch.nn.Parameter(torch.randn(5, device=device))]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    assert not params[0].is_contiguous()
    ref_opt = fusedlr.AdamW(ref_params, lr=1e-2, backend="torch")
    opt = fusedlr.AdamW(params, lr=1e-2, backend=backend_for(device))
    for step in range(3):
        set_grads(ref_params, step)
        set_grads(params, step)
        ref_opt.step()
        if step == 0:
            with pytest.warns(RuntimeWarning, match="reference"):
                opt.step()
        else:
            opt.step()
        assert_same_state(ref_opt, opt, ref_params, params, what=f"step {step}:")


# ---------------------------------------------------------------- AMP
def _model(device, dtype=torch.float32, seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device, dtype)


def _loss(model, i, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + i)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(32, 5, generator=g).to(device, dtype), torch.randn(32, 3, generator=g).to(device, dtype)
    return ((model(x) - y) ** 2).float().mean() * 10.0


@pytest.mark.parametrize("device", DEVICES_EMU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("user_unscales", [False, True])
def test_grad_scaler_with_injected_inf(device, dtype, user_unscales) -> None:
    dev, device_ = tdev(device), device
    ref_model, model = _model(dev, dtype), _model(dev, dtype)
    sched = fusedlr.get_schedule("cosine", num_warmup_steps=2, num_training_steps=12)
    kw = dict(lr=1e-2, schedule=sched, max_grad_norm=0.5, amsgrad=True)
    ref_opt = fusedlr.AdamW(ref_model.parameters(), backend="torch", **kw)
    opt = make_opt(model.parameters(), device_, **kw)
    device = dev
    s_ref = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=3)
    s = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=3)
    bad = {2, 5}
    for i in range(8):
        for m, o, sc in ((ref_model, ref_opt, s_ref), (model, opt, s)):
            o.zero_grad()
            sc.scale(_loss(m, i, device)).backward()
            if i in bad:
                m[2].weight.grad[0, 0] = float("inf") if i == 2 else float("nan")
            if user_unscales:
                sc.unscale_(o)
        before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()} if i > 0 else None
        p_before = [p.detach().clone() for p in model.parameters()]
        s_ref.step(ref_opt)
        s_ref.update()
        s.step(opt)
        s.update()
        assert s.get_scale() == s_ref.get_scale()
        if i in bad:
            for a, b in zip(p_before, model.parameters()):
                assert torch.equal(a, b), "a step with a non-finite gradient changed a parameter"
            if before is not None:
                for k, v in opt.state_dict()["state"][0].items():
                    assert torch.equal(before[k].cpu(), v.cpu()), f"skipped step changed state {k}"
        assert_same_state(ref_opt, opt, list(ref_model.parameters()), list(model.parameters()), what=f"step {i}:")
    assert int(opt.schedule_index) == 8 - len(bad)


@pytest.mark.parametrize("device", DEVICES_EMU)
def test_found_inf_attribute_contract_skips(device) -> None:
    device_, device = device, tdev(device)
    p = torch.nn.Parameter(torch.ones(3, device=device))
    opt = make_opt([p], device_)
    p.grad = torch.ones(3, device=device)
    opt.found_inf = torch.tensor(1.0, device=device)
    opt.step()
    assert torch.equal(p.detach().cpu(), torch.ones(3))
    assert int(opt.state[p]["step"]) == 0
    opt.found_inf = torch.tensor(0.0, device=device)
    opt.step()
    assert not torch.equal(p.detach().cpu(), torch.ones(3))


# ---------------------------------------------------------------- passes called directly
def _bucket(params, amsgrad=False) -> Bucket:
    st = lambda p: torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
    return Bucket(
        params=params,
        exp_avgs=[st(p) for p in params],
        exp_avg_sqs=[st(p) for p in params],
        max_exp_avg_sqs=[st(p) for p in params] if amsgrad else None,
        steps=torch.ones(len(params), dtype=torch.int64, device=params[0].device if params else "cpu"),
    )


def _backend_module(device):
    from fusedlr.extension import cpu, cuda

    if device == "emu":
        return emulated_cuda_backend()
    return cuda if device == "cuda" else cpu


@pytest.mark.parametrize("device", DEVICES_EMU)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("inv_scale", [None, 0.25])
def test_grad_stats_matches_reference(device, dtype, inv_scale) -> None:
    backend, device = _backend_module(device), tdev(device)
    grads = make_params([0, 1, 7, 4097, 40_000], dtype, device, seed=4)
    grads = [g.detach() for g in grads]
    grads[2][3] = float("inf")
    grads[3][0] = float("nan")
    grads[3][5] = float("-inf")
    inv = None if inv_scale is None else torch.tensor(inv_scale, device=device)
    bucket = _bucket([torch.zeros_like(g) for g in grads])
    out_ref = torch.tensor([1.5, 2.0], device=device)
    out = out_ref.clone()
    reference.grad_stats(bucket, grads, inv, out_ref)
    backend.grad_stats(bucket, grads, inv, out)
    assert float(out[1]) == 2.0 + 3  # the kernels add the number of non-finite elements
    assert float(out_ref[1]) == 2.0 + 2  # the reference, of pieces holding one (see reference.grad_stats)
    assert torch.isnan(out[0]) and torch.isnan(out_ref[0])
    finite = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
    out_ref, out = torch.zeros(2, device=device), torch.zeros(2, device=device)
    reference.grad_stats(bucket, finite, inv, out_ref)
    backend.grad_stats(bucket, finite, inv, out)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES_EMU)
def test_update_with_nan_clip_coefficient_propagates_nan(device) -> None:
    backend, device = _backend_module(device), tdev(device)
    params = [torch.ones(5, device=device)]
    ref_b, b = _bucket([p.clone() for p in params]), _bucket([p.clone() for p in params])
    grads = [torch.ones(5, device=device)]
    hyper = GroupHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)
    stats = torch.tensor([float("nan"), 0.0], device=device)
    ctrl = StepControl(
        k=torch.zeros((), dtype=torch.int64, device=device),
        schedule=None,
        schedule_table=None,
        stats=stats,
        max_norm=1.0,
        inv_scale=None,
        found_inf=None,
    )
    reference.adamw_update(ref_b, grads, hyper, ctrl)
    backend.adamw_update(b, grads, hyper, ctrl)
    assert torch.isnan(b.params[0]).all() and torch.isnan(ref_b.params[0]).all()


# ---------------------------------------------------------------- schedules
def _schedules() -> list[fusedlr.Schedule]:
    gs = fusedlr.get_schedule
    return [
        gs("constant"),
        gs("constant_with_warmup", num_warmup_steps=7),
        gs("linear", num_warmup_steps=5, num_training_steps=50),
        gs("linear", num_warmup_steps=0, num_training_steps=1),
        gs("cosine", num_warmup_steps=5, num_training_steps=50),
        gs("cosine", num_warmup_steps=3, num_training_steps=40, num_cycles=1.5),
        gs("cosine_with_restarts", num_warmup_steps=4, num_training_steps=60, num_cycles=3),
        gs("polynomial", num_warmup_steps=5, num_training_steps=50, lr_end=1e-5, power=2.0, lr_init=1e-3),
        gs("polynomial", num_warmup_steps=0, num_training_steps=30, lr_end=0.0, power=0.5, lr_init=1e-3),
        gs("inverse_sqrt", num_warmup_steps=10),
        gs("inverse_sqrt", num_warmup_steps=0, timescale=7),
        gs("cosine_with_min_lr", num_warmup_steps=5, num_training_steps=50, min_lr_rate=0.1),
        gs("cosine_warmup_with_min_lr", num_warmup_steps=5, num_training_steps=50, min_lr_rate=0.05),
        gs(
            "cosine_warmup_with_min_lr", num_warmup_steps=6, num_training_steps=50, min_lr_rate=0.05, warmup_lr_rate=0.2
        ),
        gs("warmup_stable_decay", num_warmup_steps=5, num_training_steps=50, num_decay_steps=20, min_lr_ratio=0.1),
        gs(
            "warmup_stable_decay",
            num_warmup_steps=5,
            num_stable_steps=10,
            num_decay_steps=20,
            warmup_type="cosine",
            decay_type="1-sqrt",
            min_lr_ratio=0.0,
        ),
        gs(
            "warmup_stable_decay",
            num_warmup_steps=8,
            num_stable_steps=3,
            num_decay_steps=12,
            warmup_type="1-sqrt",
            decay_type="linear",
            min_lr_ratio=0.2,
            num_cycles=1.0,
        ),
        gs("warmup_stable_decay", num_warmup_steps=0, num_stable_steps=4, num_decay_steps=0),
        gs("step", step_size=7, gamma=0.5),
        gs("multistep", milestones=[3, 10, 10, 25], gamma=0.3),
        gs("exponential", gamma=0.97),
        gs("onecycle", num_training_steps=60),
        gs("onecycle", num_training_steps=60, pct_start=0.25, anneal_strategy="linear", three_phase=True),
        gs("onecycle", num_training_steps=10, pct_start=0.0),
        *torch_kind_schedules(),
    ]


def test_every_schedule_kind_is_tested() -> None:
    from fusedlr.schedules import Kind

    assert {s.kind for s in _schedules()} == set(Kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", _schedules(), ids=lambda s: f"{s.name}{list(s.params)}")
def test_schedule_eval_matches_python(device, schedule) -> None:
    ks = torch.cat([torch.arange(0, 130), torch.tensor([1000, 12345, 10**6, 2**31 + 3, 2**40])]).to(device)
    got = extension.schedule_eval(schedule.as_tensor(device), ks)
    want = schedule(ks)
    assert got.dtype == torch.float64 and got.shape == ks.shape
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-12, atol=1e-14, equal_nan=True)
    for k in (0, 1, 5, 49, 50, 51):  # the int path of Schedule.__call__ too
        torch.testing.assert_close(float(got[k]), schedule(k), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES_EMU)
@pytest.mark.parametrize("name", ["onecycle", "warmup_stable_decay", "multistep"])
def test_schedules_in_the_optimizer(device, name) -> None:
    sched = {s.name: s for s in _schedules()}[name]
    run_pair(device, [7, 100], torch.float32, steps=6, lr=1e-2, schedule=sched)


# ---------------------------------------------------------------- availability and errors
@needs_ext
def test_availability_messages() -> None:
    from fusedlr.extension import cpu, cuda

    assert cpu.available(torch.device("cpu")) is None
    assert "CPU tensors" in cpu.available(torch.device("cuda", 0))
    assert cuda.available(torch.device("cpu")) is not None
    if not extension.has_kernel("cuda"):
        assert "pip install --no-build-isolation -e ." in cuda.available(torch.device("cuda", 0))
    assert fusedlr.backends.resolve("auto", torch.device("cpu")) is cpu
    assert fusedlr.backends.resolve("cpu", torch.device("cpu")) is cpu


def test_missing_extension_message_names_the_install_command() -> None:
    assert "pip install --no-build-isolation -e ." in extension.INSTALL_HINT


@needs_ext
def test_op_rejects_bad_arguments_before_writing() -> None:
    p = torch.zeros(4, 6)
    pt = p.t()  # dense, fine; a strided slice is not
    bad = torch.zeros(4, 12)[:, ::2]
    k = torch.zeros((), dtype=torch.int64)
    steps = torch.ones(1, dtype=torch.int64)

    def call(params, grads, m, v, **kw):
        args = dict(schedule=None, stats=None, max_norm=None, inv_scale=None, found_inf=None)
        args.update(kw)
        torch.ops.fusedlr.adamw_update(
            params,
            grads,
            m,
            v,
            [],
            steps,
            k,
            args["schedule"],
            args["stats"],
            args["max_norm"],
            args["inv_scale"],
            args["found_inf"],
            1e-3,
            0.9,
            0.999,
            1e-8,
            0.0,
            False,
            [],
            [],
        )

    with pytest.raises(RuntimeError, match="not contiguous"):
        call([bad], [torch.ones_like(bad)], [torch.zeros_like(bad)], [torch.zeros_like(bad)])
    with pytest.raises(RuntimeError, match="strides"):
        call([pt], [torch.ones_like(pt)], [torch.zeros(6, 4)], [torch.zeros(6, 4)])
    with pytest.raises(RuntimeError, match="state of param 0 must be"):
        call([p], [torch.ones_like(p)], [torch.zeros(4, 6, dtype=torch.float16)], [torch.zeros_like(p)])
    with pytest.raises(RuntimeError, match="max_norm needs stats"):
        call([p], [torch.ones_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)], max_norm=1.0)
    with pytest.raises(RuntimeError, match="same length"):
        call([p], [], [torch.zeros_like(p)], [torch.zeros_like(p)])
    assert torch.equal(p, torch.zeros(4, 6))


@pytest.mark.parametrize("device", DEVICES)
def test_step_bumps_version_counters(device) -> None:
    """Like torch's in-place ops: autograd notices a parameter updated after it was saved for backward."""
    w = torch.nn.Parameter(torch.ones(3, device=device))
    loss = (w * w).sum()  # saves w
    w.grad = torch.ones(3, device=device)
    opt = fusedlr.AdamW([w], backend=backend_for(device))
    version = w._version
    opt.step()
    assert w._version > version
    assert opt.state[w]["exp_avg"]._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_ext
def test_opcheck() -> None:
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)]
    grads = [torch.randn_like(p) for p in ps]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    vmax = [torch.zeros_like(p) for p in ps]
    steps = torch.ones(2, dtype=torch.int64)
    k = torch.zeros((), dtype=torch.int64)
    sched = fusedlr.get_schedule("cosine", num_warmup_steps=1, num_training_steps=10).as_tensor()
    stats = torch.tensor([4.0, 0.0])
    args = (
        ps,
        grads,
        ms,
        vs,
        vmax,
        steps,
        k,
        sched,
        stats,
        1.0,
        torch.tensor(0.5),
        torch.tensor(0.0),
        1e-3,
        0.9,
        0.999,
        1e-8,
        0.01,
        False,
        [],
        [],
    )
    torch.library.opcheck(torch.ops.fusedlr.adamw_update.default, args)
    torch.library.opcheck(torch.ops.fusedlr.grad_stats.default, (grads, torch.tensor(0.5), torch.zeros(2)))
    # the folded step (fusedlr.control.FoldedUpdate): GradScaler's scale, counters advanced, outputs written
    folded = dict(
        applied_lr=torch.zeros(3, dtype=torch.float64),
        lr_index=2,
        scale=torch.tensor(4.0),
        skip_nonfinite=True,
        advance=True,
        advance_k=True,
        norm_out=torch.zeros(()),
        found_inf_out=torch.zeros(()),
    )
    folded_args = args[:10] + (None, None) + args[12:]
    torch.library.opcheck(torch.ops.fusedlr.adamw_update.default, folded_args, folded)
    stats_args = (grads, None, torch.full((2,), 7.0))
    torch.library.opcheck(torch.ops.fusedlr.grad_stats.default, stats_args, dict(scale=torch.tensor(4.0), reset=True))
    torch.library.opcheck(torch.ops.fusedlr.schedule_eval.default, (sched, torch.arange(20)))
    # a launch set: two buckets (segments) of their own hyperparameters, steps and applied-LR entry, the first
    # with a tensor LR; bf16 params with fp32 masters and stochastic rounding (pids, one tensor per segment)
    bf = [torch.randn(n, generator=g).bfloat16() for n in (4, 3, 2)]
    set_args = dict(
        params=bf,
        grads=[torch.randn_like(p) for p in bf],
        exp_avgs=[torch.zeros_like(p, dtype=torch.float32) for p in bf],
        exp_avg_sqs=[torch.zeros_like(p, dtype=torch.float32) for p in bf],
        max_exp_avg_sqs=[],
        masters=[p.float() for p in bf],
        remainders=[],
        steps=[torch.zeros(2, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)],
        k=torch.zeros((), dtype=torch.int64),
        applied_lr=torch.zeros(3, dtype=torch.float64),
        sizes=[2, 1],
        groups=[2, 0],
        lr=[0.0, 1e-2],
        beta1=[0.9, 0.8],
        beta2=[0.999, 0.99],
        eps=[1e-8, 1e-6],
        weight_decay=[0.01, 0.0],
        maximize=[0, 1],
        lr_tensors=[torch.tensor(2e-2, dtype=torch.float64), None],
        pids=[torch.tensor([0, 1]), torch.tensor([2])],
        schedule=sched,
        stats=torch.tensor([4.0, 0.0]),
        max_norm=1.0,
        found_inf=None,
        scale=torch.tensor(4.0),
        skip_nonfinite=True,
        advance_k=True,
        norm_out=torch.zeros(()),
        found_inf_out=torch.zeros(()),
        seed=7,
        stochastic=True,
    )
    torch.library.opcheck(torch.ops.fusedlr.adamw_update_set.default, (), set_args)
    stats_set = (grads + bf, [2, 3], torch.full((2,), 7.0))
    set_kwargs = dict(scale=torch.tensor(4.0), reset=True)
    torch.library.opcheck(torch.ops.fusedlr.grad_stats_set.default, stats_set, set_kwargs)


@needs_ext
def test_torch_compile_traces_one_update_op_for_several_groups() -> None:
    """Three param groups (one with a tensor LR) on cpu: the traced step holds one grad_stats_set and one
    adamw_update_set (a launch set, fusedlr/extension/_common.py), and equals the reference backend."""
    torch._dynamo.reset()

    def groups(params: list[torch.Tensor]) -> list[dict]:
        return [
            {"params": params[:1]},
            {"params": params[1:2], "lr": torch.tensor(3e-2, dtype=torch.float64), "betas": (0.8, 0.99)},
            {"params": params[2:], "weight_decay": 0.0, "eps": 1e-6},
        ]

    ref_params = make_params([7, 33, 5, (4, 3)], torch.float32, "cpu")
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    kw = dict(lr=1e-2, max_grad_norm=1.0, schedule=fusedlr.get_schedule("linear", 1, 10))
    ref_opt = fusedlr.AdamW(groups(ref_params), backend="torch", **kw)
    opt = fusedlr.AdamW(groups(params), backend="cpu", **kw)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    @torch.compile(backend=counting_backend)
    def train_step():
        opt.step()

    for step in range(3):
        set_grads(ref_params, step)
        set_grads(params, step)
        ref_opt.step()
        train_step()
        assert_same_state(ref_opt, opt, ref_params, params, what=f"step {step}:")
    calls = [
        [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("fusedlr.")]
        for gm in graphs
    ]
    # a graph may hold one pass of the step (a graph break lies between them), never one op per group
    want = {"fusedlr.grad_stats_set", "fusedlr.adamw_update_set"}
    assert set(sum(calls, [])) == want, calls
    assert all(len(c) == len(set(c)) for c in calls), calls


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces_the_step(device) -> None:
    torch._dynamo.reset()
    ref_params = make_params([7, 33], torch.float32, device)
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    kw = dict(lr=1e-2, max_grad_norm=1.0, schedule=fusedlr.get_schedule("linear", 1, 10))
    ref_opt = fusedlr.AdamW(ref_params, backend="torch", **kw)
    opt = fusedlr.AdamW(params, backend=backend_for(device), **kw)

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        if device == "cpu":
            return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    @torch.compile(backend=counting_backend)
    def train_step():
        opt.step()

    for step in range(4):
        set_grads(ref_params, step)
        set_grads(params, step)
        ref_opt.step()
        train_step()  # the first step too: it creates the state inside the traced function
        assert_same_state(ref_opt, opt, ref_params, params, what=f"step {step}:")
    traced = "\n".join(str(gm.graph) for gm in graphs)
    assert "fusedlr.adamw_update" in traced and "fusedlr.grad_stats" in traced


# ---------------------------------------------------------------- CUDA only
@needs_ext
@needs_cuda
@pytest.mark.gpu
def test_cuda_step_is_sync_free() -> None:
    params = make_params([0, 5, 4097, (64, 33)], torch.bfloat16, "cuda")
    opt = fusedlr.AdamW(
        params, lr=1e-2, amsgrad=True, max_grad_norm=1.0, backend="cuda", schedule=fusedlr.get_schedule("cosine", 2, 20)
    )
    set_grads(params, 0)
    opt.step()  # warm-up: states, tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            for p in params:
                p.grad.normal_()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@needs_ext
@needs_cuda
@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager() -> None:
    sizes = [0, 7, 4097, (64, 33), 1]
    ref_params = make_params(sizes, torch.float32, "cuda")
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    kw = dict(lr=1e-2, amsgrad=True, max_grad_norm=0.5, schedule=fusedlr.get_schedule("cosine", 2, 20))
    ref_opt = fusedlr.AdamW(ref_params, backend="cuda", **kw)
    opt = fusedlr.AdamW(params, backend="cuda", **kw)
    set_grads(params, 0)
    set_grads(ref_params, 0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    ref_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(1, 6):
        set_grads(ref_params, step)
        g = torch.Generator().manual_seed(10_000 * 0 + step)
        for p in params:
            p.grad.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        graph.replay()
        ref_opt.step()
        torch.cuda.synchronize()
        for pr, p in zip(ref_params, params):
            # equal up to the float32 atomics order of the norm reduction
            torch.testing.assert_close(p, pr, rtol=1e-6, atol=1e-7)
            for key in ref_opt.state[pr]:
                torch.testing.assert_close(opt.state[p][key], ref_opt.state[pr][key], rtol=1e-6, atol=1e-9)
        assert int(opt.schedule_index) == int(ref_opt.schedule_index)


@needs_ext
@needs_cuda
@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_tensor_larger_than_2_pow_31_updates_its_tail() -> None:
    n = 2**31 + 5
    need = n * (2 + 2 + 4 + 4) + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    from fusedlr.extension import cuda

    p = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    g = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    tail = slice(n - 1000, n)
    gen = torch.Generator(device="cuda").manual_seed(0)
    p[tail] = torch.randn(1000, device="cuda", generator=gen).bfloat16()
    g[tail] = torch.randn(1000, device="cuda", generator=gen).bfloat16()
    p[:3] = 1.0
    g[:3] = 0.5
    big = _bucket([p])
    small = _bucket([torch.cat([p[:3], p[tail]]).clone()])
    small_g = [torch.cat([g[:3], g[tail]])]
    out_big, out_small = torch.zeros(2, device="cuda"), torch.zeros(2, device="cuda")
    cuda.grad_stats(big, [g], None, out_big)
    reference.grad_stats(small, small_g, None, out_small)
    torch.testing.assert_close(out_big, out_small, rtol=1e-5, atol=0)
    hyper = GroupHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False)
    ctrl = StepControl(
        k=torch.zeros((), dtype=torch.int64, device="cuda"),
        schedule=None,
        schedule_table=None,
        stats=out_big,
        max_norm=1.0,
        inv_scale=None,
        found_inf=None,
    )
    cuda.adamw_update(big, [g], hyper, ctrl)
    reference.adamw_update(small, small_g, hyper, ctrl)
    got = torch.cat([p[:3], p[tail]])
    torch.testing.assert_close(got, small.params[0], **PARAM_TOL[torch.bfloat16])
    torch.testing.assert_close(torch.cat([big.exp_avgs[0][:3], big.exp_avgs[0][tail]]), small.exp_avgs[0])
    torch.testing.assert_close(torch.cat([big.exp_avg_sqs[0][:3], big.exp_avg_sqs[0][tail]]), small.exp_avg_sqs[0])
    assert bool((p[3 : n - 1000] == 0).all())  # zero grads: weight decay of zero params leaves zeros


@pytest.mark.parametrize("device", DEVICES_EMU)
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=["lr32", "lr64"])
def test_tensor_lr_and_applied_lr_match_the_reference(device, lr_dtype) -> None:
    """A tensor LR filled in place between steps, a schedule and a skipped step: the compiled kernels
    (and the CUDA kernels' code, emulated) read the LR on the device and write applied_lr as the
    reference does."""
    ref_params = make_params([5, 9000], torch.float32, tdev(device))
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    ref_lr, lr = (torch.tensor(1e-2, dtype=lr_dtype, device=tdev(device)) for _ in range(2))
    kw = dict(max_grad_norm=1.0, schedule=fusedlr.get_schedule("linear", 1, 10))
    ref_opt = fusedlr.AdamW(ref_params, lr=ref_lr, backend="torch", **kw)
    opt = make_opt(params, device, lr=lr, **kw)
    for step in range(4):
        ref_lr.fill_(1e-2 / (step + 1))
        lr.fill_(1e-2 / (step + 1))
        skip = torch.tensor(1.0 if step == 2 else 0.0, device=tdev(device))
        ref_opt.found_inf, opt.found_inf = skip, skip.clone()
        set_grads(ref_params, step)
        set_grads(params, step)
        ref_opt.step()
        opt.step()
        assert_same_state(ref_opt, opt, ref_params, params, what=f"step {step}:")
        torch.testing.assert_close(opt.applied_lr(), ref_opt.applied_lr(), rtol=1e-15, atol=0)
    assert float(opt.applied_lr()) == pytest.approx(1e-2 / 4 * fusedlr.get_schedule("linear", 1, 10)(2))
