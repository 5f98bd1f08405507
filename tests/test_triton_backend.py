"""The Triton backend (``fusedlr/triton``) against the reference backend, state by state.

On a machine without CUDA the kernels run under the Triton interpreter on CPU tensors:
``TRITON_INTERPRET=1`` is set while ``fusedlr.triton`` is imported (the interpreter is chosen
when the kernels are defined) and, through ``monkeypatch``, during this module's tests only, so
other test modules never see it. With CUDA the same tests run compiled on the GPU, plus the
GPU-only checks at the end (no sync, CUDA graph capture, launch count, 2**31-element tensors).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

CUDA = torch.cuda.is_available()
_saved_env = os.environ.get("TRITON_INTERPRET")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    import fusedlr.triton as ftriton  # defines the kernels (interpreted on a CPU-only machine)
finally:
    if not CUDA:
        if _saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _saved_env

import triton
import triton.language as tl

import fusedlr
from fusedlr import reference
from fusedlr.bucket import Bucket
from fusedlr.control import FoldedUpdate, GroupHyper, StepControl
from fusedlr.schedules import Kind
from schedule_cases import torch_kind_schedules

# The kernel modules (``fusedlr.triton.grad_stats`` is shadowed by the function of that name).
K_ADAMW = sys.modules["fusedlr.triton.adamw"]
K_STATS = sys.modules["fusedlr.triton.grad_stats"]
K_SCHED = sys.modules["fusedlr.triton.schedule"]
K_TABLES = sys.modules["fusedlr.triton.tables"]
K_PREC = sys.modules["fusedlr.triton.precision"]

if not CUDA and type(K_ADAMW._adamw_kernel).__name__ != "InterpretedFunction":
    # A loud collection error, not a skip: a skip here silently dropped this whole file once.
    raise RuntimeError(
        "fusedlr.triton was imported before this test module without TRITON_INTERPRET=1 and there is no GPU: "
        "some other test imports the Triton backend at collection time; keep it out of the way"
    )

DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled Triton kernels)")

pytestmark = pytest.mark.filterwarnings(
    # The interpreter evaluates both sides of tl.where with numpy (e.g. 1/0 in an unused branch).
    "ignore:divide by zero:RuntimeWarning",
    "ignore:invalid value:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:GradScaler is going to stop passing itself:FutureWarning",
)


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


# ---------------------------------------------------------------- helpers
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),  # at most one bf16 ulp apart
    torch.float16: dict(rtol=2**-10, atol=1e-6),
}


# With clipping, float64 states inherit the float32 norm's rounding (its summation order differs).
TOL_CLIPPED64 = dict(rtol=1e-7, atol=1e-9)


def assert_same_state(ref: fusedlr.AdamW, tri: fusedlr.AdamW, what: str = "") -> None:
    """Every param and every state tensor of ``tri`` equals ``ref``'s (to the dtype's tolerance)."""
    tol = dict(TOL)
    if ref.max_grad_norm is not None:
        tol[torch.float64] = TOL_CLIPPED64
    for gr, gt in zip(ref.param_groups, tri.param_groups):
        for i, (pr, pt) in enumerate(zip(gr["params"], gt["params"])):
            torch.testing.assert_close(pt, pr, **tol[pr.dtype], msg=lambda m, i=i: f"{what} param {i}: {m}")
            sr, st = ref.state[pr], tri.state[pt]
            assert sr.keys() == st.keys()
            for key in sr:
                if key == "step":
                    assert torch.equal(st[key], sr[key]), f"{what} param {i} step"
                else:
                    assert st[key].stride() == sr[key].stride()
                    torch.testing.assert_close(
                        st[key], sr[key], **tol[sr[key].dtype], msg=lambda m, i=i, key=key: f"{what} param {i} {key}: {m}"
                    )


def param_sets(
    build: Callable[[torch.Generator], list[dict]], **opt_kwargs: object
) -> tuple[fusedlr.AdamW, fusedlr.AdamW]:
    """Two identical param groups (same values, same layouts): a reference and a triton optimizer."""
    ref = fusedlr.AdamW(build(torch.Generator().manual_seed(0)), backend="torch", **opt_kwargs)
    tri = fusedlr.AdamW(build(torch.Generator().manual_seed(0)), backend="triton", **opt_kwargs)
    return ref, tri


def set_grads(opt: fusedlr.AdamW, step: int, scale: float = 1.0, dtype: torch.dtype | None = None) -> None:
    """Deterministic gradients (a fresh tensor each call) for every param of ``opt``."""
    gen = torch.Generator().manual_seed(100 + step)
    for group in opt.param_groups:
        for p in group["params"]:
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
            if dtype is not None and dtype != p.dtype and hasattr(p, "grad_dtype"):
                p.grad_dtype = None  # allow a gradient dtype other than the param's
            # In the param's layout, as autograd makes it.
            p.grad = torch.empty_like(p, dtype=dtype or p.dtype).copy_(g)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def mixed_groups(dtype: torch.dtype) -> Callable[[torch.Generator], list[dict]]:
    """Sizes 7, 0, 4097 (a full chunk and a tail), 1, a matrix, a transposed (dense, non-contiguous)
    matrix and a misaligned view (no vector accesses); two groups with different hyperparameters."""

    def build(gen: torch.Generator) -> list[dict]:
        misaligned = rand(gen, 34, dtype=dtype)[1:]
        return [
            {
                "params": [
                    leaf(rand(gen, 7, dtype=dtype)),
                    leaf(rand(gen, 0, dtype=dtype)),
                    leaf(rand(gen, 4097, dtype=dtype)),
                    leaf(rand(gen, 1, dtype=dtype)),
                ],
                "weight_decay": 0.1,
            },
            {
                "params": [
                    leaf(rand(gen, 3, 5, dtype=dtype)),
                    leaf(rand(gen, 8, 6, dtype=dtype).t()),
                    leaf(misaligned),
                ],
                "weight_decay": 0.0,
                "lr": 3e-2,
                "betas": (0.8, 0.99),
                "eps": 1e-6,
            },
        ]

    return build


SCHED = fusedlr.get_schedule("cosine", num_warmup_steps=2, num_training_steps=10)


# ---------------------------------------------------------------- interface
def test_available() -> None:
    assert ftriton.NAME == "triton"
    assert ftriton.available(DEVICE) is None
    assert fusedlr.backends.resolve("triton", DEVICE) is ftriton
    assert "CUDA" in ftriton.available(torch.device("meta"))


def test_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = ftriton.available(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fusedlr.backends.resolve("triton", torch.device("cpu"))


def test_missing_triton_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ftriton, "_IMPORT_ERROR", ModuleNotFoundError("No module named 'triton'", name="triton"))
    assert ftriton.available(DEVICE) == "triton is not installed: pip install triton"


# ---------------------------------------------------------------- schedule
SCHEDULES = [
    ("constant", 0, 10, {}),
    ("constant_with_warmup", 5, 100, {}),
    ("linear", 5, 50, {}),
    ("cosine", 5, 50, {"num_cycles": 0.7}),
    ("cosine_with_restarts", 5, 50, {"num_cycles": 3}),
    ("polynomial", 5, 50, {"lr_init": 1e-3, "lr_end": 1e-5, "power": 2.0}),
    ("polynomial", 0, 50, {"lr_init": 1e-3, "power": 0.0}),
    ("inverse_sqrt", 5, None, {}),
    ("inverse_sqrt", 0, None, {"timescale": 7}),
    ("cosine_with_min_lr", 5, 50, {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", 5, 50, {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", 5, 50, {"min_lr_rate": 0.1, "warmup_lr_rate": 0.2}),
    ("warmup_stable_decay", 5, 50, {"num_decay_steps": 20}),
    ("warmup_stable_decay", 5, 50, {"num_decay_steps": 20, "warmup_type": "1-sqrt", "decay_type": "1-sqrt"}),
    ("warmup_stable_decay", 4, 60, {"num_decay_steps": 9, "warmup_type": "cosine", "decay_type": "linear",
                                    "min_lr_ratio": 0.1, "num_cycles": 0.3}),
    ("step", 0, None, {"step_size": 7, "gamma": 0.5}),
    ("multistep", 0, None, {"milestones": [3, 10, 20], "gamma": 0.3}),
    ("multistep", 0, None, {"milestones": list(range(1, 33, 2)), "gamma": 0.9}),
    ("exponential", 0, None, {"gamma": 0.97}),
    ("exponential", 0, None, {"gamma": 0.0}),
    ("onecycle", 0, 50, {}),
    ("onecycle", 0, 50, {"three_phase": True, "anneal_strategy": "linear"}),
]


def test_every_schedule_kind_is_covered() -> None:
    kinds = {fusedlr.get_schedule(name, w, t, **kw).kind for name, w, t, kw in SCHEDULES}
    assert kinds | {s.kind for s in torch_kind_schedules()} == set(Kind)


@pytest.mark.parametrize("sched", torch_kind_schedules(), ids=lambda s: s.name)
def test_in_kernel_torch_kinds_match_python(sched: fusedlr.Schedule) -> None:
    k = torch.cat([torch.arange(0, 130), torch.tensor([1000, 12345, 10**6, 2**31 + 3, 2**40])]).to(DEVICE)
    got = K_SCHED.evaluate_multiplier(sched, k)
    torch.testing.assert_close(got, sched(k), rtol=1e-9, atol=1e-14, equal_nan=True)


@pytest.mark.parametrize("name,warmup,total,kwargs", SCHEDULES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SCHEDULES)])
def test_in_kernel_schedule_matches_python(name: str, warmup: int, total: int | None, kwargs: dict) -> None:
    sched = fusedlr.get_schedule(name, warmup, total, **kwargs)
    k = torch.cat([torch.arange(0, 70), torch.tensor([99, 1000, 123_457, 10**7])]).to(DEVICE)
    got = K_SCHED.evaluate_multiplier(sched, k)
    want = sched(k)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12, equal_nan=True)


# ---------------------------------------------------------------- AdamW against the reference
FLAGS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("amsgrad,maximize", FLAGS, ids=["adamw", "amsgrad", "maximize", "amsgrad-maximize"])
@pytest.mark.parametrize("max_norm", [None, 0.05, 1e4], ids=["noclip", "clip", "clip-inactive"])
def test_matches_reference(dtype: torch.dtype, amsgrad: bool, maximize: bool, max_norm: float | None) -> None:
    ref, tri = param_sets(mixed_groups(dtype), lr=1e-2, amsgrad=amsgrad, maximize=maximize,
                          schedule=SCHED, max_grad_norm=max_norm)
    for step in range(4):
        set_grads(ref, step)
        set_grads(tri, step)
        ref.step()
        tri.step()
        assert_same_state(ref, tri, f"step {step}")
        if max_norm is not None:
            torch.testing.assert_close(tri.grad_norm, ref.grad_norm, rtol=1e-5, atol=0)
            assert (ref.grad_norm > max_norm).item() == (max_norm < 1)
    assert int(tri.schedule_index) == 4


@pytest.mark.parametrize(
    "sched",
    [None, fusedlr.get_schedule("multistep", milestones=[1, 3], gamma=0.5),
     fusedlr.get_schedule("onecycle", num_training_steps=6, three_phase=True),
     fusedlr.get_schedule("warmup_stable_decay", 1, 5, num_decay_steps=2, decay_type="1-sqrt")],
    ids=["none", "multistep", "onecycle", "wsd"],
)
def test_schedule_drives_the_update(sched: fusedlr.Schedule | None) -> None:
    ref, tri = param_sets(mixed_groups(torch.float32), lr=1e-2, schedule=sched)
    for step in range(5):
        for opt in (ref, tri):
            set_grads(opt, step)
            opt.step()
        assert_same_state(ref, tri, f"step {step}")


def test_many_tensors_mixed_groups_and_dtypes() -> None:
    """40 small tensors in three groups; fp32 and bf16 params in one group make separate buckets."""

    def build(gen: torch.Generator) -> list[dict]:
        sizes = [(i * 37) % 300 for i in range(40)]  # includes 0
        ps = [leaf(rand(gen, n, dtype=torch.bfloat16 if i % 3 == 0 else torch.float32)) for i, n in enumerate(sizes)]
        return [
            {"params": ps[:15]},
            {"params": ps[15:30], "lr": 5e-3, "weight_decay": 0.0, "amsgrad": True},
            {"params": ps[30:], "betas": (0.5, 0.9), "maximize": True},
        ]

    ref, tri = param_sets(build, lr=1e-2, max_grad_norm=1.0, schedule=SCHED)
    for step in range(3):
        for opt in (ref, tri):
            set_grads(opt, step)
            opt.step()
        assert_same_state(ref, tri, f"step {step}")
        torch.testing.assert_close(tri.grad_norm, ref.grad_norm, rtol=1e-5, atol=0)


def test_bf16_grads_for_fp32_params() -> None:
    ref, tri = param_sets(mixed_groups(torch.float32), lr=1e-2, max_grad_norm=0.5)
    for step in range(3):
        for opt in (ref, tri):
            set_grads(opt, step, dtype=torch.bfloat16)
            opt.step()
        assert_same_state(ref, tri, f"step {step}")


def test_non_dense_param_is_left_to_the_reference() -> None:
    """A strided view cannot be addressed flat: its bucket falls back to the reference, in place."""

    def build(gen: torch.Generator) -> list[dict]:
        base = rand(gen, 8, 6)
        return [{"params": [leaf(base[:, ::2]), leaf(rand(gen, 5))]}]

    ref, tri = param_sets(build, lr=1e-2, max_grad_norm=0.1)
    view = tri.param_groups[0]["params"][0]
    assert not view.is_contiguous()
    for step in range(3):
        for opt in (ref, tri):
            set_grads(opt, step)
            opt.step()
        assert_same_state(ref, tri, f"step {step}")
    assert tri.state[view]["exp_avg"].abs().sum() > 0


def test_grads_in_another_layout() -> None:
    """Gradients whose strides differ from the param's are read through a (read-only) copy."""
    ref, tri = param_sets(mixed_groups(torch.float32), lr=1e-2, max_grad_norm=0.5)
    for step in range(3):
        for opt in (ref, tri):
            set_grads(opt, step)
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.dim() == 2:  # transposed copy of the same values
                        p.grad = p.grad.t().contiguous().t() if p.is_contiguous() else p.grad.contiguous()
            opt.step()
        assert_same_state(ref, tri, f"step {step}")


def test_grad_table_refreshes_only_when_grads_move(monkeypatch: pytest.MonkeyPatch) -> None:
    uploads: list[int] = []
    real = K_TABLES._upload
    monkeypatch.setattr(K_TABLES, "_upload", lambda host, *a: uploads.append(host.numel()) or real(host, *a))
    ref, tri = param_sets(mixed_groups(torch.float32), lr=1e-2)
    for opt in (ref, tri):
        set_grads(opt, 0)
        opt.step()
    assert len(uploads) == 6  # the two groups' launch set: rows, blocks, bucket bounds, grads, order, segments
    for step in (1, 2):  # same gradient tensors, new values: nothing to upload
        for opt in (ref, tri):
            gen = torch.Generator().manual_seed(100 + step)
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
            opt.step()
        assert_same_state(ref, tri, f"step {step}")
    assert len(uploads) == 6
    for opt in (ref, tri):  # new gradient tensors (alignment as before): only the grad table is uploaded again
        set_grads(opt, 3)
        opt.step()
    assert len(uploads) == 7
    assert_same_state(ref, tri, "new grads")


def test_zero_size_only_bucket() -> None:
    ref, tri = param_sets(lambda gen: [{"params": [leaf(rand(gen, 0)), leaf(rand(gen, 0, 3))]}], max_grad_norm=1.0)
    for opt in (ref, tri):
        set_grads(opt, 0)
        opt.step()
    assert_same_state(ref, tri)
    assert tri.grad_norm.item() == 0.0


# ---------------------------------------------------------------- AMP
def test_grad_scaler_skips_and_backs_off() -> None:
    def build(gen: torch.Generator) -> list[dict]:
        return [{"params": [leaf(rand(gen, 7)), leaf(rand(gen, 4097)), leaf(rand(gen, 3, 5))]}]

    ref, tri = param_sets(build, lr=1e-2, max_grad_norm=1.0, schedule=SCHED)
    scalers = [torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10, growth_interval=2) for _ in range(2)]
    bad = {1: float("inf"), 3: float("nan")}
    for step in range(5):
        before = [p.detach().clone() for p in tri.param_groups[0]["params"]]
        states_before = {k: v.clone() for k, v in tri.state[tri.param_groups[0]["params"][1]].items()}
        for opt, scaler in zip((ref, tri), scalers):
            scaler.scale(torch.zeros((), device=DEVICE))  # as scaler.scale(loss).backward() would
            scale_before = scaler.get_scale()
            set_grads(opt, step, scale=scale_before)
            if step in bad:
                opt.param_groups[0]["params"][1].grad[-1] = bad[step]
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        if step in bad:
            assert scalers[1].get_scale() == scale_before / 2  # backed off
            for b, p in zip(before, tri.param_groups[0]["params"]):
                assert torch.equal(b, p)
            for k, v in tri.state[tri.param_groups[0]["params"][1]].items():
                assert torch.equal(v, states_before[k]), k
        assert_same_state(ref, tri, f"step {step}")
    assert int(tri.schedule_index) == 5 - len(bad)


def test_found_inf_attribute_skips() -> None:
    p = leaf(torch.ones(3, device=DEVICE))
    opt = fusedlr.AdamW([p], backend="triton")
    p.grad = torch.ones(3, device=DEVICE)
    opt.grad_scale = None
    opt.found_inf = torch.tensor(1.0, device=DEVICE)
    opt.step()
    assert torch.equal(p, torch.ones(3, device=DEVICE))
    opt.found_inf = torch.tensor(0.0, device=DEVICE)
    opt.step()
    assert not torch.equal(p, torch.ones(3, device=DEVICE))


# ---------------------------------------------------------------- the backend interface directly
def _bucket(params: list[torch.Tensor], steps: list[int], amsgrad: bool = False) -> Bucket:
    dt = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(7)

    def state(p: torch.Tensor) -> torch.Tensor:
        return torch.rand(p.shape, generator=gen, dtype=torch.float64).to(DEVICE, dt)

    return Bucket(
        params=params,
        exp_avgs=[state(p) - 0.5 for p in params],
        exp_avg_sqs=[state(p) * 1e-3 for p in params],
        max_exp_avg_sqs=[state(p) * 2e-3 for p in params] if amsgrad else None,
        steps=torch.tensor(steps, dtype=torch.int64, device=DEVICE),
    )


def _clone(b: Bucket) -> Bucket:
    c = lambda ts: None if ts is None else [t.clone() for t in ts]
    return Bucket(c(b.params), c(b.exp_avgs), c(b.exp_avg_sqs), c(b.max_exp_avg_sqs), b.steps.clone())


def _assert_same_bucket(a: Bucket, b: Bucket) -> None:
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for x, y in zip(getattr(a, name) or [], getattr(b, name) or []):
            torch.testing.assert_close(y, x, **TOL[x.dtype], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("beta2", [0.999, 0.99999999, 0.0])
def test_bias_corrections_for_any_step(beta2: float) -> None:
    """Steps from 1 to 10**9 and betas near 1 (no cancellation) or 0."""
    steps = [1, 2, 17, 1000, 10**7, 10**9]
    gen = torch.Generator().manual_seed(3)
    params = [rand(gen, 9) for _ in steps]
    grads = [rand(gen, 9) for _ in steps]
    ref_b, tri_b = _bucket(params, steps, amsgrad=True), None
    tri_b = _clone(ref_b)
    hyper = GroupHyper(lr=1e-3, beta1=0.9 if beta2 else 0.0, beta2=beta2, eps=1e-8, weight_decay=0.01,
                       amsgrad=True, maximize=False)
    ctrl = StepControl(k=torch.tensor(3, device=DEVICE), schedule=None, schedule_table=None, stats=None,
                       max_norm=None, inv_scale=None, found_inf=None)
    reference.adamw_update(ref_b, grads, hyper, ctrl)
    ftriton.adamw_update(tri_b, grads, hyper, ctrl)
    _assert_same_bucket(ref_b, tri_b)


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("with_scale", [False, True])
def test_grad_stats(gdtype: torch.dtype, with_scale: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    grads = [rand(gen, n, dtype=gdtype) * 3 for n in (5, 0, 4097, 1)]
    params = [torch.zeros_like(g) for g in grads]
    bucket = _bucket(params, [1] * len(params))
    inv = torch.tensor(1 / 1024, device=DEVICE) if with_scale else None
    outs = []
    for impl in (reference, ftriton):
        out = torch.full((2,), 0.5, device=DEVICE)  # accumulates into what is there
        impl.grad_stats(bucket, grads, inv, out)
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=0)
    assert outs[1][1].item() == 0.5
    grads[2][7] = float("nan")
    grads[2][4096] = float("-inf")
    grads[0][0] = float("inf")
    out = torch.zeros(2, device=DEVICE)
    ftriton.grad_stats(bucket, grads, inv, out)
    assert out[1].item() == 3 and not torch.isfinite(out[0])
    if gdtype == torch.float64:  # finite in float64, inf once squared in float32: counted as finite
        grads = [torch.full((3,), 1e300, dtype=torch.float64, device=DEVICE)]
        bucket = _bucket([torch.zeros_like(grads[0])], [1])
        out = torch.zeros(2, device=DEVICE)
        ftriton.grad_stats(bucket, grads, None, out)
        assert out[1].item() == 0 and out[0].item() == math.inf


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of 1-d ``t`` that is a view 1 element into a larger tensor (not 16-byte aligned)."""
    return torch.cat([torch.zeros(1, dtype=t.dtype, device=t.device), t])[1:]


class _UpdateRecorder:
    """Stands in for ``_adamw_kernel``: records each launch's ``ALIGNED`` and program ids, then runs it."""

    def __init__(self, kernel: object) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., object]:
        def launch(*args: object, **kwargs: object) -> object:
            self.launches.append((kwargs["ALIGNED"], sorted(args[2].tolist())))  # args[2]: the order slice
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_misaligned_tensor_leaves_the_others_vectorized(monkeypatch: pytest.MonkeyPatch) -> None:
    """Alignment is decided per tensor: a view 1 element (4 bytes) into a larger tensor goes to the
    scalar launch, the bucket's aligned tensors (one across a chunk boundary) to the vectorized one;
    both equal the reference, and the vectorized path equals the scalar path bit for bit."""
    gen = torch.Generator().manual_seed(11)
    n = K_TABLES.CHUNK + 1  # two programs
    params = [rand(gen, n), rand(gen, 37), rand(gen, 5)]
    grads = [rand(gen, p.numel()) for p in params]
    hyper = GroupHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=True, maximize=False)
    ctrl = StepControl(k=torch.tensor(0, device=DEVICE), schedule=None, schedule_table=None, stats=None,
                       max_norm=None, inv_scale=None, found_inf=None)
    ref_b = _bucket(params, [1, 2, 3], amsgrad=True)
    tri_b, scalar_b = _clone(ref_b), _clone(ref_b)
    tri_b.params[1] = _misaligned(tri_b.params[1])
    scalar_b.params = [_misaligned(p) for p in scalar_b.params]
    reference.adamw_update(ref_b, grads, hyper, ctrl)
    rec = _UpdateRecorder(K_ADAMW._adamw_kernel)
    monkeypatch.setattr(K_ADAMW, "_adamw_kernel", rec)
    ftriton.adamw_update(tri_b, grads, hyper, ctrl)
    assert rec.launches == [(True, [0, 1, 3]), (False, [2])]  # programs 0, 1: tensor 0; 2: tensor 1; 3: tensor 2
    _assert_same_bucket(ref_b, tri_b)
    ftriton.adamw_update(scalar_b, grads, hyper, ctrl)
    assert rec.launches[2:] == [(False, [0, 1, 2, 3])]  # one launch when every tensor is misaligned
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(tri_b, name), getattr(scalar_b, name))), name
    # A misaligned gradient moves its (aligned) tensor to the scalar launch; pass 1 reads it per tensor too.
    moved = [grads[0], grads[1], _misaligned(grads[2])]
    ftriton.adamw_update(tri_b, moved, hyper, ctrl)
    assert rec.launches[3:] == [(True, [0, 1]), (False, [2, 3])]
    outs = [torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE)]
    reference.grad_stats(tri_b, moved, None, outs[0])
    ftriton.grad_stats(tri_b, moved, None, outs[1])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=0)
    strided = _bucket([torch.zeros(8, 6, device=DEVICE)[:, ::2]], [1])
    assert K_TABLES.bucket_tables(strided) is None  # not dense: the reference updates it


class _LaunchCounter:
    """Stands in for a @triton.jit kernel and records the grid of every launch."""

    def __init__(self, kernel: object) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., object]:
        self.grids.append(grid)
        return self.kernel[grid]


def test_one_launch_per_bucket_whatever_the_tensor_count(monkeypatch: pytest.MonkeyPatch) -> None:
    for n in (3, 40):
        stats, upd = _LaunchCounter(K_STATS._grad_stats_kernel), _LaunchCounter(K_ADAMW._adamw_kernel)
        with monkeypatch.context() as patch:
            patch.setattr(K_STATS, "_grad_stats_kernel", stats)
            patch.setattr(K_ADAMW, "_adamw_kernel", upd)
            sizes = [5000 if i == 0 else 7 for i in range(n)]
            ps = [leaf(torch.zeros(s, device=DEVICE)) for s in sizes]
            opt = fusedlr.AdamW(ps, backend="triton", max_grad_norm=1.0)
            for step in range(2):
                set_grads(opt, step)
                opt.step()
        chunks = sum(-(-s // K_TABLES.CHUNK) for s in sizes)
        assert stats.grids == [(chunks,)] * 2 and upd.grids == [(chunks,)] * 2


# ---------------------------------------------------------------- low-precision modes (fusedlr.precision)
# Test kernels are defined inside the tests, where TRITON_INTERPRET is set (without a GPU).


@pytest.fixture
def correctly_rounded_sqrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference's float32 square root correctly rounded, as the kernel's (``tl.sqrt_rn``) and CUDA's are:
    torch's CPU float32 sqrt is off by one ulp on a fraction of inputs, which the bitwise comparisons below
    would see. (A float32 square root through float64 is correctly rounded.)"""

    def sqrt_(ts: list[torch.Tensor]) -> None:
        for t in ts:
            t.copy_(t.double().sqrt()) if t.dtype == torch.float32 else t.sqrt_()

    monkeypatch.setattr(torch, "_foreach_sqrt_", sqrt_)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise_state(ref: fusedlr.AdamW, tri: fusedlr.AdamW, what: str) -> None:
    """Every param and state tensor of ``tri`` has ``ref``'s bits (dtype, strides and every bit)."""
    for gr, gt in zip(ref.param_groups, tri.param_groups):
        for i, (pr, pt) in enumerate(zip(gr["params"], gt["params"])):
            pairs = [("param", pr, pt)] + [(k, ref.state[pr][k], tri.state[pt][k]) for k in ref.state[pr]]
            assert ref.state[pr].keys() == tri.state[pt].keys()
            for key, a, b in pairs:
                assert a.dtype == b.dtype and a.stride() == b.stride(), f"{what} param {i} {key}"
                diff = int((_bits(a) != _bits(b)).sum())
                assert diff == 0, f"{what} param {i} {key}: {diff} of {a.numel()} elements differ"


def precision_groups(dtype: torch.dtype) -> Callable[[torch.Generator], list[dict]]:
    """Sizes 7, 0, 1030 (not a multiple of BLOCK), 1, 4100 (two programs), a transposed (dense,
    non-contiguous: element offsets are memory offsets) and a misaligned matrix; two groups."""

    def build(gen: torch.Generator) -> list[dict]:
        misaligned = rand(gen, 34, dtype=dtype)[1:]
        return [
            {"params": [leaf(rand(gen, n, dtype=dtype)) for n in (7, 0, 1030, 1, 4100)], "weight_decay": 0.1},
            {"params": [leaf(rand(gen, 8, 6, dtype=dtype).t()), leaf(misaligned)], "lr": 3e-2, "betas": (0.8, 0.99)},
        ]

    return build


def set_exact_grads(opt: fusedlr.AdamW, step: int, scale: float) -> None:
    """Gradients k / 16 (|k| <= 16) times ``scale`` (a power of two): their squares sum exactly in
    float32 in any order, so both backends see the same norm, clip coefficient and unscaled values."""
    gen = torch.Generator().manual_seed(100 + step)
    for group in opt.param_groups:
        for p in group["params"]:
            k = torch.randint(-16, 17, p.shape, generator=gen, dtype=torch.int64)
            p.grad = torch.empty_like(p).copy_(k.to(torch.float64) / 16 * scale)


# (master_weights, stochastic_rounding, state_dtype, param dtype): every valid combination family
PRECISION_MODES = [
    (True, False, None, torch.bfloat16),
    (True, False, None, torch.float16),
    ("remainder", False, None, torch.bfloat16),
    (False, True, None, torch.bfloat16),
    (False, False, torch.bfloat16, torch.bfloat16),
    (False, True, torch.bfloat16, torch.bfloat16),
    (False, True, torch.bfloat16, torch.float16),
    (False, True, torch.bfloat16, torch.float32),
    (True, True, torch.bfloat16, torch.float16),
    ("remainder", True, torch.bfloat16, torch.bfloat16),
]


@pytest.mark.usefixtures("correctly_rounded_sqrt")
@pytest.mark.filterwarnings("error:.*reference backend:RuntimeWarning")
@pytest.mark.parametrize(
    "master,sr,state_dtype,dtype,amsgrad",
    # amsgrad where max_exp_avg_sq is stored in a low-precision way (bf16 states, stochastic rounding): with
    # float32 states and no stochastic rounding its store is the default mode's (test_matches_reference)
    [(*mode, amsgrad) for mode in PRECISION_MODES for amsgrad in (False, True)
     if not amsgrad or mode[1] or mode[2] is not None],
    ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, bool) else f"{v}",
)
def test_precision_modes_match_the_reference_bitwise(
    monkeypatch: pytest.MonkeyPatch, master: object, sr: bool, state_dtype: torch.dtype | None, dtype: torch.dtype,
    amsgrad: bool,
) -> None:
    """Each mode in the kernel: the reference's bits after every step (clipped, scheduled, under a
    GradScaler whose third step overflows and is skipped), with no fallback to the reference."""
    kwargs = dict(lr=1e-2, amsgrad=amsgrad, schedule=SCHED, max_grad_norm=0.5, master_weights=master,
                  stochastic_rounding=sr, state_dtype=state_dtype, seed=2**32 - 3)
    ref, tri = param_sets(precision_groups(dtype), **kwargs)
    upd = _LaunchCounter(K_ADAMW._adamw_kernel)
    monkeypatch.setattr(K_ADAMW, "_adamw_kernel", upd)
    folded = _count_folded_steps(monkeypatch)
    scalers = [torch.amp.GradScaler(DEVICE.type, init_scale=2.0**4, growth_interval=100) for _ in range(2)]
    for step in range(4):
        for opt, scaler in zip((ref, tri), scalers):
            scaler.scale(torch.zeros((), device=DEVICE))
            set_exact_grads(opt, step, scaler.get_scale())
            if step == 2:
                opt.param_groups[0]["params"][2].grad[5] = float("inf")
            scaler.step(opt)
            scaler.update()
        assert_bitwise_state(ref, tri, f"step {step}")
    assert int(tri.schedule_index) == 3
    # every bucket's update ran in the kernel: both groups in one launch set, split in two launches by group 2's
    # misaligned tensor
    assert len(upd.grids) == 2 * 4, upd.grids
    assert folded == [tri] * 4  # the triton steps folded their small ops into the kernels


@pytest.mark.usefixtures("correctly_rounded_sqrt")
@pytest.mark.parametrize("state_dtype,sr", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "bf16-sr"])
def test_float64_params_with_low_precision_moments(state_dtype: torch.dtype, sr: bool) -> None:
    """float64 math stored into float32/bfloat16 moments (float64 step scalars differ from the reference's
    in the last bits: compared to the stored dtypes' tolerance)."""
    ref, tri = param_sets(precision_groups(torch.float64), lr=1e-2, amsgrad=True, state_dtype=state_dtype,
                          stochastic_rounding=sr)
    for step in range(3):
        for opt in (ref, tri):
            set_exact_grads(opt, step, 1.0)
            opt.step()
        assert_same_state(ref, tri, f"step {step}")


def test_precision_helpers_follow_the_spec_on_special_values() -> None:
    """Every float32 bit pattern class (ties, NaN, inf, signed zeros, subnormals, largest finite) and
    element offsets past 2**32 through the Triton helpers, against ``fusedlr.precision``."""
    from fusedlr import precision

    @triton.jit
    def probe(x_ptr, offs_ptr, param_ptr, rem_ptr, join_ptr, sr_ptr, near_ptr, bits_ptr, key, n, BLOCK_: tl.constexpr):
        """Each helper of ``fusedlr/triton/precision.py`` on float32 values ``x`` at element offsets ``offs``."""
        i = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
        mask = i < n
        x = tl.load(x_ptr + i, mask=mask)
        offs = tl.load(offs_ptr + i, mask=mask)
        high, low = K_PREC.split_master(x)
        tl.store(param_ptr + i, high, mask=mask)
        tl.store(rem_ptr + i, low, mask=mask)
        tl.store(join_ptr + i, K_PREC.join_master(high, low), mask=mask)
        r = K_PREC.random_bits(tl.full((), key, tl.int64).to(tl.uint32), 2, offs)
        tl.store(bits_ptr + i, r.to(tl.int64), mask=mask)
        tl.store(sr_ptr + i, K_PREC.round_stochastic(x, r), mask=mask)
        tl.store(near_ptr + i, K_PREC.round_nearest(x, tl.bfloat16), mask=mask)

    highs = torch.tensor([0x0000, 0x0001, 0x3F80, 0x7F7F, 0x7F80, 0x7FC0, 0x8000, 0xBF80, 0xFF7F, 0xFFC1])
    lows = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF])
    u = ((highs[:, None] << 16) | lows[None, :]).flatten()
    u = torch.cat([u, torch.randint(0, 2**32, (3000,), generator=torch.Generator().manual_seed(1))])
    x = torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).view(torch.float32).to(DEVICE)
    n = x.numel()
    offs = torch.randint(0, 2**45, (n,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    offs[:4] = torch.tensor([0, 2**32 - 1, 2**32, 2**40 + 3])
    key = 0xDEADBEEF
    out = dict(param=torch.empty(n, dtype=torch.bfloat16, device=DEVICE),
               rem=torch.empty(n, dtype=torch.int16, device=DEVICE),
               join=torch.empty(n, dtype=torch.float32, device=DEVICE),
               sr=torch.empty(n, dtype=torch.bfloat16, device=DEVICE),
               near=torch.empty(n, dtype=torch.bfloat16, device=DEVICE),
               bits=torch.empty(n, dtype=torch.int64, device=DEVICE))
    probe[(-(-n // 1024),)](x, offs, out["param"], out["rem"], out["join"], out["sr"], out["near"],
                            out["bits"], key, n, BLOCK_=1024)
    bits = precision.random_bits(torch.tensor(key, device=DEVICE), precision.Streams.EXP_AVG_SQ, offs)
    param, rem = precision.split_master(x)
    expected = dict(param=param, rem=rem, join=precision.join_master(param, rem), bits=bits,
                    sr=precision.stochastic_round_bf16(x, bits), near=x.to(torch.bfloat16))
    for name, want in expected.items():
        got = out[name]
        same = _bits(got) == _bits(want)
        if got.is_floating_point():
            same |= torch.isnan(got) & torch.isnan(want)
        assert bool(same.all()), f"{name}: {int((~same).sum())} differ, e.g. x bits {u[~same.cpu()][:4].tolist()}"
    nan = torch.isnan(x)
    assert torch.equal(_bits(out["join"])[~nan], _bits(x)[~nan]), "the remainder stores the master exactly"


def test_tensor_key_follows_the_spec() -> None:
    from fusedlr import precision

    @triton.jit
    def probe(out_ptr, pids_ptr, steps_ptr, seed):
        i = tl.program_id(0)
        key = K_PREC.tensor_key(tl.full((), seed, tl.int64), tl.load(pids_ptr + i), tl.load(steps_ptr + i))
        tl.store(out_ptr + i, key.to(tl.int64))

    pids = torch.tensor([0, 1, 7, 123456], device=DEVICE)
    steps = torch.tensor([1, 2**32 - 1, 2**32 + 5, 2**40 + 2**33 + 9], device=DEVICE)
    for seed in (0, 1, 2**31 + 11, 2**32 - 1):
        out = torch.empty(4, dtype=torch.int64, device=DEVICE)
        probe[(4,)](out, pids, steps, seed)
        assert torch.equal(out, precision.tensor_keys(seed, pids, steps)), seed


# ---------------------------------------------------------------- folded step (fusedlr.control.FoldedUpdate)
def _count_folded_steps(monkeypatch: pytest.MonkeyPatch) -> list[fusedlr.AdamW]:
    """The optimizers whose steps take the folded path from now on (one entry per step)."""
    calls: list[fusedlr.AdamW] = []
    real = fusedlr.AdamW._prepare_folded

    def spy(self: fusedlr.AdamW, *args: object, **kwargs: object) -> object:
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(fusedlr.AdamW, "_prepare_folded", spy)
    return calls


def _gradscaler_inverse(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale`` as GradScaler computes it (float64, rounded to float32)."""
    return scale.double().reciprocal().float()


def test_folded_grad_stats_inverts_the_scale_and_resets() -> None:
    """``scale=``: the kernel's inverse is GradScaler's (same bits as the unfolded pass given that inverse);
    ``reset=True`` overwrites what ``out`` held, ``reset=False`` adds to it."""
    gen = torch.Generator().manual_seed(5)
    grads = [rand(gen, n) * 300 for n in (5, 0, 4097, 1)]
    grads[2][9] = float("inf")
    bucket = _bucket([torch.zeros_like(g) for g in grads], [1] * len(grads))
    scale = torch.tensor(3.0 * 2**10, device=DEVICE)  # 1/scale is not a power of two
    want = torch.zeros(2, device=DEVICE)
    ftriton.grad_stats(bucket, grads, _gradscaler_inverse(scale), want)
    assert want[1].item() == 1
    out = torch.full((2,), 123.0, device=DEVICE)
    ftriton.grad_stats(bucket, grads, None, out, scale=scale, reset=True)
    assert torch.equal(out, want)
    grads[2][9] = 1.0
    ftriton.grad_stats(bucket, grads, None, out, scale=scale)
    finite = torch.zeros(2, device=DEVICE)
    ftriton.grad_stats(bucket, grads, _gradscaler_inverse(scale), finite)
    assert torch.equal(out, want + finite)
    with pytest.raises(ValueError, match="not both"):
        ftriton.grad_stats(bucket, grads, _gradscaler_inverse(scale), out, scale=scale)


def test_inverse_of_gradscalers_scale_is_gradscalers() -> None:
    """``unscale_factor`` of a scale (a correctly rounded float32 division) has the bits of GradScaler's
    ``float32(1 / float64(scale))`` for float32 scales of every exponent (subnormal inverses, inf, 0, NaN), and
    for float64 scales."""

    @triton.jit
    def probe(x_ptr, out_ptr, n, BLOCK_: tl.constexpr):
        i = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
        tl.store(out_ptr + i, K_STATS.unscale_factor(x_ptr + i, True), mask=i < n)

    bits = torch.randint(0, 0x7F800000, (20000,), generator=torch.Generator().manual_seed(3), dtype=torch.int64)
    x = torch.cat([bits.to(torch.int32).view(torch.float32),
                   torch.tensor([0.0, 1.0, 3.0, 2.0**127, 3.0 * 2**126, float("inf"), float("nan"), 1e-45, 65536.0])])
    x = x.to(DEVICE)
    out = torch.empty_like(x)
    probe[(-(-x.numel() // 1024),)](x, out, x.numel(), BLOCK_=1024)
    want = _gradscaler_inverse(x)
    same = (_bits(out) == _bits(want)) | (out.isnan() & want.isnan())
    assert bool(same.all()), x[~same][:4].tolist()
    x64 = x.double() * (1 + 2**-30)  # a float64 scale (the attribute contract): its inverse rounded once
    probe[(-(-x.numel() // 1024),)](x64, out, x.numel(), BLOCK_=1024)
    want = _gradscaler_inverse(x64)
    same = (_bits(out) == _bits(want)) | (out.isnan() & want.isnan())
    assert bool(same.all()), x64[~same][:4].tolist()


def test_folded_update_does_the_small_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """One folded update of a bucket with a zero-size and a misaligned tensor (two launches): the reference's
    values with steps + 1 and GradScaler's inverse, then every step counter (the zero-size one's included)
    advanced once, k advanced, grad_norm, found_inf and applied_lr[group] written, the arrival counter left
    zero; a step with a non-finite gradient count in stats changes nothing but grad_norm and found_inf."""
    gen = torch.Generator().manual_seed(13)
    params = [rand(gen, K_TABLES.CHUNK + 3), rand(gen, 0), rand(gen, 37), rand(gen, 5)]
    grads = [rand(gen, p.numel()) * 512 for p in params]
    hyper = GroupHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=True, maximize=False)
    tri_b = _bucket(params, [0, 4, 1, 7], amsgrad=True)
    tri_b.params[2] = _misaligned(tri_b.params[2])
    ref_b = _clone(tri_b)
    ref_b.steps += 1  # the reference reads this update's step numbers
    scale = torch.tensor(512.0, device=DEVICE)
    stats = torch.tensor([2.5, 0.0], device=DEVICE)

    def ctrl(k: torch.Tensor, inv_scale: torch.Tensor | None) -> StepControl:
        return StepControl(k=k, schedule=SCHED, schedule_table=SCHED.as_tensor(DEVICE), stats=stats, max_norm=1.0,
                           inv_scale=inv_scale, found_inf=None)

    k = torch.tensor(3, device=DEVICE)
    norm, found_inf = torch.full((), -1.0, device=DEVICE), torch.full((), -1.0, device=DEVICE)
    applied_lr = torch.full((3,), math.nan, dtype=torch.float64, device=DEVICE)
    fold = FoldedUpdate(scale=scale, skip_nonfinite=True, group=1, advance_k=True, norm_out=norm,
                        found_inf_out=found_inf)
    rec = _UpdateRecorder(K_ADAMW._adamw_kernel)
    monkeypatch.setattr(K_ADAMW, "_adamw_kernel", rec)
    assert ftriton.folds(tri_b, grads)
    commit = ftriton.prepare_update(tri_b, grads, hyper, ctrl(k, None), applied_lr, fold)
    assert torch.equal(tri_b.steps, torch.tensor([0, 4, 1, 7], device=DEVICE)) and int(k) == 3  # prepare: nothing
    commit()
    ref_lr = torch.full((), math.nan, dtype=torch.float64, device=DEVICE)
    reference.adamw_update(ref_b, grads, hyper, ctrl(torch.tensor(3, device=DEVICE), _gradscaler_inverse(scale)),
                           ref_lr)
    assert [aligned for aligned, _ in rec.launches] == [True, False]
    _assert_same_bucket(ref_b, tri_b)
    assert torch.equal(tri_b.steps, torch.tensor([1, 5, 2, 8], device=DEVICE)) and int(k) == 4
    assert torch.equal(norm, stats[0].double().sqrt().float()) and float(found_inf) == 0.0
    assert float(applied_lr[1]) == float(ref_lr) == 1e-2 * SCHED(3)
    assert applied_lr[[0, 2]].isnan().all()
    assert int(K_TABLES.bucket_tables(tri_b).update_arrived) == 0
    # Skipped (stats[1] > 0): nothing but the step's flags.
    stats[1] = 2.0
    before = _clone(tri_b)
    ftriton.prepare_update(tri_b, grads, hyper, ctrl(k, None), applied_lr, fold)()
    _assert_same_bucket(before, tri_b)
    assert torch.equal(tri_b.steps, before.steps) and int(k) == 4
    assert float(found_inf) == 1.0 and torch.equal(norm, stats[0].double().sqrt().float())
    assert float(applied_lr[1]) == float(ref_lr)


def test_zero_size_only_bucket_does_not_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """No program to do a folded update's work: the bucket is left to the unfolded step (steps still advance)."""
    bucket = _bucket([rand(torch.Generator(), 0)], [0])
    assert not ftriton.folds(bucket, [torch.zeros(0, device=DEVICE)])
    fold = FoldedUpdate(scale=None, skip_nonfinite=False, group=0, advance_k=True, norm_out=None, found_inf_out=None)
    ctrl = StepControl(k=torch.tensor(0, device=DEVICE), schedule=None, schedule_table=None, stats=None,
                       max_norm=None, inv_scale=None, found_inf=None)
    hyper = GroupHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)
    with pytest.raises(ValueError, match="folded update"):
        ftriton.prepare_update(bucket, [torch.zeros(0, device=DEVICE)], hyper, ctrl, None, fold)
    folded = _count_folded_steps(monkeypatch)
    p, q = leaf(torch.zeros(0, device=DEVICE)), leaf(torch.ones(3, device=DEVICE))
    opt = fusedlr.AdamW([{"params": [p]}, {"params": [q]}], backend="triton", max_grad_norm=1.0)
    for _ in range(2):
        p.grad, q.grad = torch.zeros(0, device=DEVICE), torch.ones(3, device=DEVICE)
        opt.step()
    assert folded == [] and int(opt.state[p]["step"]) == int(opt.state[q]["step"]) == 2
    assert int(opt.schedule_index) == 2


class _StepOps(TorchDispatchMode):
    """What a step enqueues: each kernel launch (``_Kernel``) and every torch op dispatched outside of them
    (the interpreter's own tensor handling inside a launch is not the step's); profiler records left out."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.launching = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.launching and not str(func).startswith("profiler."):
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class _Kernel:
    """Stands in for a jitted kernel: records each launch's kernel name into ``ops``, then runs it."""

    def __init__(self, kernel: object, name: str, ops: _StepOps) -> None:
        self.kernel, self.name, self.ops = kernel, name, ops

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., object]:
        def launch(*args: object, **kwargs: object) -> object:
            self.ops.names.append(self.name)
            self.ops.launching = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.ops.launching = False

        return launch


# name: (param groups, GradScaler, max_grad_norm, a misaligned tensor, launches of a steady step)
FOLDED_CASES = {
    "plain": (1, False, None, False, ["update"]),
    "clip": (1, False, 0.5, False, ["stats", "update"]),
    "amp": (1, True, None, False, ["stats", "update"]),
    "amp+clip": (1, True, 0.5, False, ["stats", "update"]),
    "2buckets+amp+clip": (2, True, 0.5, False, ["stats", "update"]),
    "mixed-alignment+amp+clip": (1, True, 0.5, True, ["stats", "update", "update"]),
    "3buckets+amp+clip": (3, True, 0.5, False, ["stats", "update"]),
    "3buckets-mixed-alignment+amp+clip": (3, True, 0.5, True, ["stats", "update", "update"]),
}


def _folded_groups(groups: int, misaligned: bool, lr_tensor: bool = False) -> Callable[[torch.Generator], list[dict]]:
    """Sizes 7, 0, 4097 and 1 (and a 33-element view 1 element into a tensor), in one group; with a 3x5 and a
    transposed matrix, two; with a 5000-element, a zero-size and a 2x3 tensor, three (each group with its own
    LR, betas, eps and weight decay; ``lr_tensor``: the third group's LR a float64 tensor)."""

    def build(gen: torch.Generator) -> list[dict]:
        first = [leaf(rand(gen, n)) for n in (7, 0, 4097, 1)] + ([leaf(rand(gen, 34)[1:])] if misaligned else [])
        out = [{"params": first, "weight_decay": 0.1}]
        if groups >= 2:
            out.append({"params": [leaf(rand(gen, 3, 5)), leaf(rand(gen, 8, 6).t())], "weight_decay": 0.0,
                        "lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6})
        if groups >= 3:
            lr = torch.tensor(5e-3, dtype=torch.float64, device=DEVICE) if lr_tensor else 5e-3
            out.append({"params": [leaf(rand(gen, 5000)), leaf(rand(gen, 0)), leaf(rand(gen, 2, 3))],
                        "weight_decay": 0.02, "lr": lr, "betas": (0.95, 0.9995), "eps": 1e-7})
        return out

    return build


@pytest.mark.parametrize("case", FOLDED_CASES)
def test_a_steady_folded_step_is_only_its_kernel_launches(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted: kernel launches (wrapped jitted kernels) and torch ops dispatched outside of them, in a step
    with the same gradient tensors as the step before (so no pointer-table refresh: a refresh builds host
    tensors and enqueues one copy to the device, when gradient addresses change)."""
    groups, amp, clip, misaligned, want = FOLDED_CASES[case]
    ops = _StepOps()
    monkeypatch.setattr(K_STATS, "_grad_stats_kernel", _Kernel(K_STATS._grad_stats_kernel, "stats", ops))
    monkeypatch.setattr(K_ADAMW, "_adamw_kernel", _Kernel(K_ADAMW._adamw_kernel, "update", ops))
    opt = fusedlr.AdamW(_folded_groups(groups, misaligned)(torch.Generator().manual_seed(0)), lr=1e-2,
                        backend="triton", schedule=SCHED, max_grad_norm=clip)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**8) if amp else None
    set_grads(opt, 0)
    for step in range(3):
        if step:
            for group in opt.param_groups:  # new values, same tensors
                for p in group["params"]:
                    p.grad.mul_(-0.5)
        if scaler is not None:
            scaler.scale(torch.zeros((), device=DEVICE))
        ops.names.clear()
        with ops:
            opt.step() if scaler is None else scaler.step(opt)
        if scaler is not None:
            scaler.update()
    assert ops.names == want
    assert int(opt.schedule_index) == 3


@pytest.mark.parametrize("amsgrad,unscale", [(False, False), (True, False), (False, True)],
                         ids=["adamw", "amsgrad", "unscale_-first"])
def test_folded_steps_match_torch_recipe(amsgrad: bool, unscale: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.optim.AdamW`` + ``clip_grad_norm_`` + ``LambdaLR`` + ``GradScaler``: three param groups (their own
    LR, betas, eps and weight decay; the third's LR a float64 tensor) in one launch set, with zero-size tensors and
    a misaligned one (two update launches); steps 3 and 6 have an inf gradient and change nothing (params,
    moments, steps, k, applied LR) but report found_inf = 1 and the norm (``unscale``: the user calls
    ``scaler.unscale_`` first, and the step honours its recorded found_inf)."""
    folded = _count_folded_steps(monkeypatch)
    build = _folded_groups(3, True, lr_tensor=True)
    ours = fusedlr.AdamW(build(torch.Generator().manual_seed(0)), lr=1e-2, amsgrad=amsgrad, backend="triton",
                         schedule=SCHED, max_grad_norm=0.5)
    ref = torch.optim.AdamW(build(torch.Generator().manual_seed(0)), lr=1e-2, amsgrad=amsgrad)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(ref, SCHED)
    s1, s2 = (torch.amp.GradScaler(DEVICE.type, init_scale=2.0**12, growth_interval=3) for _ in range(2))
    applied = 0
    for step in range(8):
        bad = step in (3, 6)
        for opt, scaler in ((ours, s1), (ref, s2)):
            scaler.scale(torch.zeros((), device=DEVICE))
            set_grads(opt, step, scale=scaler.get_scale())
            if bad:
                opt.param_groups[0]["params"][2].grad[100] = float("inf")
        if unscale:
            s1.unscale_(ours)
        s1.step(ours)
        found_inf = s1._per_optimizer_states[id(ours)]["found_inf_per_device"][DEVICE].clone()
        s1.update()
        s2.unscale_(ref)
        params = [p for g in ref.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
        s2.step(ref)
        s2.update()
        if not bad:
            lambda_lr.step()
            applied += 1
        assert s1.get_scale() == s2.get_scale() and float(found_inf) == float(bad)
        for gr, go in zip(ref.param_groups, ours.param_groups):
            for i, (pr, po) in enumerate(zip(gr["params"], go["params"])):
                torch.testing.assert_close(po, pr, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"step {step} {i}: {m}")
                for key, value in ref.state[pr].items():
                    if key == "step":
                        assert int(ours.state[po]["step"]) == int(value) == applied, (step, i)
                    else:
                        torch.testing.assert_close(ours.state[po][key], value, rtol=1e-5, atol=1e-7)
        assert int(ours.schedule_index) == applied
        torch.testing.assert_close(ours.grad_norm, norm, rtol=1e-5, atol=0, equal_nan=True)
        if bad:
            assert math.isinf(float(ours.grad_norm))
        for gi, peak in enumerate((1e-2, 3e-2, 5e-3)):
            assert float(ours.applied_lr(gi)) == pytest.approx(peak * SCHED(applied - 1), rel=1e-12)
    assert folded == [ours] * 8


def test_folded_step_equals_the_unfolded_step_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same kernels with and without the folded small ops (``FOLDED`` off: the optimizer's torch ops, one
    launch per bucket and pass): the same bits everywhere, with three param groups in one launch set (the third's
    LR a float64 tensor), clipping, amsgrad, a misaligned tensor and GradScaler's skipped steps."""
    build = _folded_groups(3, True, lr_tensor=True)
    kwargs = dict(lr=1e-2, amsgrad=True, backend="triton", schedule=SCHED, max_grad_norm=0.5)
    folded_opt = fusedlr.AdamW(build(torch.Generator().manual_seed(0)), **kwargs)
    plain_opt = fusedlr.AdamW(build(torch.Generator().manual_seed(0)), **kwargs)
    folded = _count_folded_steps(monkeypatch)
    scalers = [torch.amp.GradScaler(DEVICE.type, init_scale=2.0**12, growth_interval=2) for _ in range(2)]
    for step in range(5):
        for opt, scaler in zip((folded_opt, plain_opt), scalers):
            scaler.scale(torch.zeros((), device=DEVICE))
            set_grads(opt, step, scale=scaler.get_scale())
            if step == 2:
                opt.param_groups[1]["params"][0].grad[1, 1] = float("nan")
            with monkeypatch.context() as patch:
                patch.setattr(ftriton, "FOLDED", opt is folded_opt)
                scaler.step(opt)
            scaler.update()
        assert_bitwise_state(plain_opt, folded_opt, f"step {step}")
        assert scalers[0].get_scale() == scalers[1].get_scale()
        torch.testing.assert_close(folded_opt.grad_norm, plain_opt.grad_norm, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(folded_opt.schedule_index, plain_opt.schedule_index)
        for gi in range(3):
            assert torch.equal(folded_opt.applied_lr(gi), plain_opt.applied_lr(gi))
    assert folded == [folded_opt] * 5 and int(folded_opt.schedule_index) == 4


# amsgrad: (update launches of a step with launch sets, with one launch set per group): the first group's
# misaligned tensor splits its launch in two; "second group": the second group in a launch set of its own
SET_LAUNCHES = {"none": (2, 4), "all": (2, 4), "second group": (3, 4)}


@pytest.mark.parametrize("amsgrad", SET_LAUNCHES)
def test_launch_sets_equal_per_group_launches_bitwise(amsgrad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three param groups (their own LR, betas, eps and weight decay; the third's LR a float64 tensor, the second
    maximizing) updated by launch set (``SETS``) have the bits of one update launch per group (``SETS`` off), with
    clipping, GradScaler (``unscale_`` first on odd steps), a skipped step and new gradient tensors every step;
    pass 1 is one launch either way."""
    build = _folded_groups(3, True, lr_tensor=True)

    def make() -> fusedlr.AdamW:
        groups = build(torch.Generator().manual_seed(0))
        groups[1]["maximize"] = True
        if amsgrad == "second group":
            groups[1]["amsgrad"] = True
        return fusedlr.AdamW(groups, lr=1e-2, amsgrad=amsgrad == "all", backend="triton", schedule=SCHED,
                             max_grad_norm=0.5)

    sets_opt, groups_opt = make(), make()
    folded = _count_folded_steps(monkeypatch)
    scalers = [torch.amp.GradScaler(DEVICE.type, init_scale=2.0**12, growth_interval=2) for _ in range(2)]
    for step in range(5):
        launches = []
        for opt, scaler in zip((sets_opt, groups_opt), scalers):
            scaler.scale(torch.zeros((), device=DEVICE))
            set_grads(opt, step, scale=scaler.get_scale())
            if step == 2:
                opt.param_groups[2]["params"][0].grad[4100] = float("inf")
            stats, upd = _LaunchCounter(K_STATS._grad_stats_kernel), _LaunchCounter(K_ADAMW._adamw_kernel)
            with monkeypatch.context() as patch:
                patch.setattr(ftriton, "SETS", opt is sets_opt)
                patch.setattr(K_STATS, "_grad_stats_kernel", stats)
                patch.setattr(K_ADAMW, "_adamw_kernel", upd)
                if step % 2:
                    scaler.unscale_(opt)
                scaler.step(opt)
            scaler.update()
            launches.append((len(stats.grids), len(upd.grids)))
        assert launches == [(1, n) for n in SET_LAUNCHES[amsgrad]], step
        assert_bitwise_state(groups_opt, sets_opt, f"step {step}")
        assert scalers[0].get_scale() == scalers[1].get_scale()
        torch.testing.assert_close(sets_opt.grad_norm, groups_opt.grad_norm, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(sets_opt.schedule_index, groups_opt.schedule_index)
        for gi in range(3):
            assert torch.equal(sets_opt.applied_lr(gi), groups_opt.applied_lr(gi))
    assert folded == [sets_opt, groups_opt] * 5 and int(sets_opt.schedule_index) == 4
    for group in sets_opt.param_groups:
        assert all(int(sets_opt.state[p]["step"]) == 4 for p in group["params"])


# ---------------------------------------------------------------- compiled for a GPU target (no GPU needed)
_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys, triton, triton.language as tl
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    import fusedlr.triton
    from fusedlr.triton import tables as T
    A = sys.modules["fusedlr.triton.adamw"]._adamw_kernel
    S = sys.modules["fusedlr.triton.grad_stats"]._grad_stats_kernel
    target = GPUTarget("cuda", 90, 32)

    def build(fn, sig, consts):
        sig = {**sig, **{k: "constexpr" for k in consts}}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        return triton.compile(src, target=target, options={"num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]

    rows = dict(ROW_=T.ROW, F_NUMEL=T.FIELD_NUMEL, F_FIRST=T.FIELD_FIRST, BLOCK_=T.BLOCK, ITERS_=T.ITERS)
    ptx = build(S, {"rows_ptr": "*i64", "blocks_ptr": "*i64", "grads_ptr": "*i64", "inv_scale_ptr": "*fp32",
                    "out_ptr": "*fp32", "partials_ptr": "*fp32", "arrived_ptr": "*i32", "bounds_ptr": "*i64",
                    "n_segs": "i32"},
                dict(HAS_INV_SCALE=True, FROM_SCALE=True, RESET=True, G_DTYPE=tl.bfloat16, ALIGN_=T.ALIGN, **rows))
    assert "ld.global.v4" in ptx, "grad_stats: no vector loads"
    assert "atom.global" in ptx and "red.global.add.f32" not in ptx and "atom.global.add.f32" not in ptx, (
        "grad_stats: the reduction must use an integer arrival counter, never float atomics")
    sig = {n: "*i64" for n in ["rows_ptr", "blocks_ptr", "order_ptr", "grads_ptr", "steps_ptr", "pids_ptr", "k_ptr"]}
    sig.update({"sched_ptr": "*fp64", "stats_ptr": "*fp32", "inv_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
                "lr_ptr": "*fp32", "applied_lr_ptr": "*fp64", "arrived_ptr": "*i32", "norm_out_ptr": "*fp32",
                "found_inf_out_ptr": "*fp32", "segs_ptr": "*i64", "n_segs": "i32"})
    sig.update({n: "fp64" for n in ["lr", "lerp_weight", "beta2", "one_minus_beta2", "log_beta1", "log_beta2",
                                    "eps", "weight_decay", "max_norm"]})
    sig["seed"] = "i64"
    fields = dict(F_P=T.FIELD_P, F_M=T.FIELD_M, F_V=T.FIELD_V, F_VMAX=T.FIELD_VMAX, F_STEP=T.FIELD_STEP,
                  F_MASTER=T.FIELD_MASTER, F_SEG=T.FIELD_SEG, **rows)
    bf16 = tl.bfloat16
    for kind, n, pd, sd, md, modes, on in [
        (3, 0, bf16, tl.float32, tl.float32, (False, False, False), True),
        (12, 3, tl.float32, tl.float32, tl.float32, (False, False, False), False),
        (10, 2, tl.float16, tl.float32, tl.float32, (False, False, False), True),
        (8, 0, tl.float64, tl.float64, tl.float64, (False, False, False), True),
        (3, 0, bf16, tl.float32, bf16, (False, True, True), True),  # remainder, stochastic bf16 moments
        (3, 0, tl.float16, tl.float32, tl.float32, (True, False, False), False),  # fp32 master
    ]:
        flags = dict(HAS_CLIP=on, HAS_INV_SCALE=on, HAS_FOUND_INF=on, AMSGRAD=on, MAXIMIZE=on, HAS_LR_TENSOR=on,
                     HAS_APPLIED_LR=on, MASTER=modes[0], REMAINDER=modes[1], STOCHASTIC=modes[2],
                     FOLDED=on, FROM_SCALE=on, SKIP_NONFINITE=on, HAS_NORM_OUT=on, HAS_FOUND_INF_OUT=on, EPILOGUE=on,
                     ADVANCE_K=on)
        ptx = build(A, sig, dict(SCHED_KIND=kind, SCHED_N=n, P_DTYPE=pd, G_DTYPE=pd, S_DTYPE=sd, M_DTYPE=md,
                                 CLIP_EPS_=1e-6, ALIGNED=True, **flags, **fields))
        assert "st.global.v" in ptx, f"adamw {kind} {pd}: no vector stores"
    print("compiled")
    """
)


def test_kernels_compile_for_sm90() -> None:
    """Compile (PTX and cubin through triton's bundled ptxas) without a GPU, as a GPU run would."""
    try:
        from triton.backends import nvidia
    except ImportError as err:  # pragma: no cover - triton without its NVIDIA backend
        pytest.skip(f"triton's NVIDIA backend is unavailable: {err}")
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"no ptxas at {ptxas}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-4000:]


# ---------------------------------------------------------------- GPU only
def _cuda_opt(n: int = 6, **kwargs: object) -> tuple[fusedlr.AdamW, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    sizes = [1 + (i * 997) % 5000 for i in range(n)]
    ps = [leaf(rand(gen, s)) for s in sizes]
    for p in ps:
        p.grad = torch.randn_like(p)
    return fusedlr.AdamW(ps, lr=1e-2, backend="triton", **kwargs), ps


@gpu
@pytest.mark.gpu
def test_step_never_syncs() -> None:
    kwargs = dict(max_grad_norm=0.5, schedule=SCHED, amsgrad=True)
    warm, _ = _cuda_opt(**kwargs)
    warm.step()  # compiles the kernels
    opt, ps = _cuda_opt(**kwargs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # the first builds and uploads the tables
            opt.step()
        for p in ps:  # new gradient tensors: the grad table is uploaded again
            p.grad = torch.ones_like(p)
        opt.step()
        scaler = torch.amp.GradScaler("cuda")
        scaler.step(opt)  # unscale + inf check inside the step
    finally:
        torch.cuda.set_sync_debug_mode(0)


@gpu
@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_steps() -> None:
    kwargs = dict(max_grad_norm=0.5, schedule=SCHED, amsgrad=True)
    graphed, _ = _cuda_opt(**kwargs)
    eager, _ = _cuda_opt(**kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.step()  # warm-up: tables and compilation before capture
    torch.cuda.current_stream().wait_stream(side)
    eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for _ in range(5):
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    assert int(graphed.schedule_index) == int(eager.schedule_index) == 6
    assert_same_state(eager, graphed, "graph")


@gpu
@pytest.mark.gpu
def test_launch_count_does_not_grow_with_tensor_count() -> None:
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for n in (4, 64):
        opt, _ = _cuda_opt(n, max_grad_norm=1.0)
        opt.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        counts.append((sum("_adamw_kernel" in s for s in names), sum("_grad_stats_kernel" in s for s in names)))
    assert counts == [(1, 1), (1, 1)], counts


@gpu
@pytest.mark.gpu
def test_tensor_past_2_31_elements() -> None:
    n = 2**31 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs 40 GiB free GPU memory, has {free / 2**30:.1f}")
    p = leaf(torch.zeros(n, dtype=torch.bfloat16, device="cuda"))
    p.grad = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    p.grad[-3:] = 2.0
    opt = fusedlr.AdamW([p], lr=0.25, weight_decay=0.0, backend="triton", max_grad_norm=1e9)
    opt.step()
    state = opt.state[p]
    # First Adam step from zero state: m = 0.1 g, p = -lr * g / (|g| + eps) = -lr.
    assert torch.equal(p[-6:].float().cpu(), torch.full((6,), -0.25))
    assert torch.equal(p[:2].float().cpu(), torch.full((2,), -0.25))
    torch.testing.assert_close(state["exp_avg"][-4:].cpu(), torch.tensor([0.1, 0.2, 0.2, 0.2]))
    torch.testing.assert_close(state["exp_avg_sq"][-4:].cpu(), torch.tensor([1e-3, 4e-3, 4e-3, 4e-3]))
    torch.testing.assert_close(opt.grad_norm.cpu(), torch.tensor(math.sqrt(n + 9.0)), rtol=1e-5, atol=0)


def test_in_place_kernels_are_not_autotuned() -> None:
    """Autotuning benchmarks a kernel by running it several times: an in-place update would be applied
    more than once. The update and reduction kernels must be plain jitted functions with fixed blocks."""
    from triton.runtime.autotuner import Autotuner

    for kernel in (K_ADAMW._adamw_kernel, K_STATS._grad_stats_kernel):
        assert not isinstance(kernel, Autotuner)
        assert not isinstance(getattr(kernel, "fn", None), Autotuner)
