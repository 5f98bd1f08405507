"""Property-based parity: hypothesis draws hyperparameters, param groups, shapes (0-d, empty, odd, strided
views, transposed, channels_last), dtypes, missing gradients, clipping, schedules and AMP skipped steps;
every backend runnable here must then track torch's recipe (``torch.optim.AdamW`` + ``clip_grad_norm_`` +
``LambdaLR`` + ``GradScaler``) step by step: params, every moment, step counters and the global norm.

Low-precision params (bf16, fp16) are compared with a torch run on float32 copies rounded to the param's
dtype after every step, which is what fusedlr specifies (fp32 math, rounded once per update).
Examples are derandomized, so a run is reproducible; ``tests/test_mutation.py`` reuses ``cases`` and
``check_case`` to show that this test catches known bugs planted in the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedlr
from fusedlr import backends

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64)
LAYOUTS = ("scalar", "empty", "odd", "strided", "transposed", "channels_last")
LOW_PRECISION_RTOL = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}  # two units in the last place
SCHEDULES = {
    "none": None,
    "linear": fusedlr.get_schedule("linear", num_warmup_steps=1, num_training_steps=6),
    "cosine": fusedlr.get_schedule("cosine", num_warmup_steps=2, num_training_steps=8),
}
AMP_SCALE = 2.0**7

pytestmark = pytest.mark.filterwarnings(
    "ignore:divide by zero:RuntimeWarning",  # the Triton interpreter evaluates both sides of tl.where
    "ignore:invalid value:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:GradScaler is going to stop passing itself:FutureWarning",
)


@dataclass(frozen=True)
class Param:
    layout: str
    dtype: torch.dtype
    dims: tuple[int, ...]
    group: int


@dataclass(frozen=True)
class Case:
    params: tuple[Param, ...]
    groups: tuple[dict, ...]  # hyperparameters of each group
    max_grad_norm: float | None
    schedule: str
    amp: bool
    grad_masks: tuple[tuple[bool, ...], ...]  # per step: which params get a gradient
    skips: tuple[bool, ...]  # per step: an inf in a gradient (AMP only)
    grad_scale: float  # gradient magnitude
    seed: int


@st.composite
def _param(draw: st.DrawFn, n_groups: int, small: bool) -> Param:
    layout = draw(st.sampled_from(LAYOUTS))
    dtype = draw(st.sampled_from(DTYPES))
    if dtype.is_complex and layout not in ("scalar", "empty", "odd"):
        dtype = torch.float32  # torch's view_as_real refuses these layouts too
    side = st.integers(1, 5 if small else 9)
    if layout == "scalar":
        dims: tuple[int, ...] = ()
    elif layout == "empty":
        dims = draw(st.sampled_from([(0,), (3, 0), (0, 2, 2)]))
    elif layout == "odd":
        dims = tuple(draw(st.lists(side, min_size=1, max_size=3)))
    elif layout == "channels_last":
        dims = (draw(st.integers(1, 2)), draw(side), draw(side), draw(side))
    else:
        dims = (draw(side), draw(side))
    return Param(layout, dtype, dims, draw(st.integers(0, n_groups - 1)))


@st.composite
def _hyper(draw: st.DrawFn) -> dict:
    return {
        "lr": draw(st.floats(1e-4, 0.1)),
        "betas": (draw(st.sampled_from([0.0, 0.5, 0.9])), draw(st.sampled_from([0.5, 0.99, 0.999]))),
        "eps": draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        "weight_decay": draw(st.sampled_from([0.0, 0.01, 0.2])),
        "amsgrad": draw(st.booleans()),
        "maximize": draw(st.booleans()),
    }


@st.composite
def cases(draw: st.DrawFn, small: bool = False) -> Case:
    """A training run to replay on fusedlr and on torch's recipe (``small``: fewer, smaller tensors)."""
    n_groups = draw(st.integers(1, 2 if small else 3))
    params = draw(st.lists(_param(n_groups, small), min_size=1, max_size=3 if small else 6))
    used = sorted({p.group for p in params})  # renumber: no group is left empty
    params = [Param(p.layout, p.dtype, p.dims, used.index(p.group)) for p in params]
    steps = draw(st.integers(1, 3 if small else 4))
    masks = []
    for _ in range(steps):
        mask = draw(st.lists(st.sampled_from([True, True, True, False]), min_size=len(params), max_size=len(params)))
        mask[draw(st.integers(0, len(params) - 1))] = True  # every step updates something
        masks.append(tuple(mask))
    amp = draw(st.booleans()) and not any(p.dtype.is_complex for p in params)  # GradScaler: no complex on CPU
    return Case(
        params=tuple(params),
        groups=tuple(draw(_hyper()) for _ in used),
        max_grad_norm=draw(st.none() | st.floats(1e-3, 10.0)),
        schedule=draw(st.sampled_from(sorted(SCHEDULES))),
        amp=amp,
        grad_masks=tuple(masks),
        skips=tuple(amp and draw(st.sampled_from([False, False, False, True])) for _ in range(steps)),
        grad_scale=draw(st.sampled_from([1e-2, 1.0, 10.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def _make(spec: Param, gen: torch.Generator) -> torch.Tensor:
    """A tensor of ``spec``'s dtype in ``spec``'s layout (values drawn in float64, then rounded)."""
    if spec.dtype.is_complex:
        return torch.randn(spec.dims, generator=gen, dtype=torch.complex128).to(DEVICE, spec.dtype)
    if spec.layout == "strided":  # every other column: not dense (compiled backends fall back for it)
        rows, cols = spec.dims
        return torch.randn(rows, 2 * cols, generator=gen, dtype=torch.float64).to(DEVICE, spec.dtype)[:, ::2]
    if spec.layout == "transposed":  # dense, not contiguous
        return torch.randn(spec.dims[::-1], generator=gen, dtype=torch.float64).to(DEVICE, spec.dtype).t()
    t = torch.randn(spec.dims, generator=gen, dtype=torch.float64).to(DEVICE, spec.dtype)
    return t.to(memory_format=torch.channels_last) if spec.layout == "channels_last" else t


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in LOW_PRECISION_RTOL else dtype


def check_case(backend: str, case: Case) -> None:
    """Replay ``case`` on fusedlr (``backend``) and on torch's recipe; assert they agree after every step."""
    gen = torch.Generator().manual_seed(case.seed)
    ours = [torch.nn.Parameter(_make(spec, gen)) for spec in case.params]
    ref = [torch.nn.Parameter(p.detach().to(_master_dtype(p.dtype), copy=True)) for p in ours]

    def grouped(params: list[torch.nn.Parameter]) -> list[dict]:
        return [
            {"params": [p for p, spec in zip(params, case.params) if spec.group == gi], **hyper}
            for gi, hyper in enumerate(case.groups)
        ]

    schedule = SCHEDULES[case.schedule]
    opt = fusedlr.AdamW(grouped(ours), schedule=schedule, max_grad_norm=case.max_grad_norm, backend=backend)
    topt = torch.optim.AdamW(grouped(ref), foreach=False)
    tsched = None if schedule is None else torch.optim.lr_scheduler.LambdaLR(topt, schedule)
    scalers = [torch.amp.GradScaler(DEVICE.type, init_scale=AMP_SCALE, growth_interval=1000) for _ in range(2)]
    if case.amp:
        for s in scalers:
            s.scale(torch.ones((), device=DEVICE))  # creates the scale; the gradients below come pre-scaled

    applied = 0
    for step, mask in enumerate(case.grad_masks):
        skip = False
        for p, r, has_grad in zip(ours, ref, mask):
            p.grad = r.grad = None
            if has_grad:
                g = torch.randn(p.shape, generator=gen, dtype=torch.complex128 if p.is_complex() else torch.float64)
                g = g * case.grad_scale
                if case.amp:
                    g = g * AMP_SCALE
                    if case.skips[step] and not skip and p.numel() > 0:
                        g.view(-1)[0] = float("inf")
                        skip = True
                p.grad = g.to(DEVICE, p.dtype)
                r.grad = p.grad.to(r.dtype, copy=True)  # clip_grad_norm_ scales it in place
        if case.amp:
            scalers[0].step(opt)
            scalers[0].update()
            scalers[1].unscale_(topt)
        if case.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_([r for r in ref if r.grad is not None], case.max_grad_norm)
        if case.amp:
            scalers[1].step(topt)
            scalers[1].update()
        else:
            opt.step()
            topt.step()
        applied += not skip
        if tsched is not None and not skip:  # fusedlr's schedule index counts applied updates only
            tsched.step()
        with torch.no_grad():
            for p, r in zip(ours, ref):
                if p.dtype in LOW_PRECISION_RTOL:
                    r.copy_(r.to(p.dtype))  # fusedlr's contract for such params: fp32 math, rounded once

        what = f"step {step}"
        if case.max_grad_norm is not None and not skip:
            torch.testing.assert_close(opt.grad_norm.double(), norm.double(), rtol=1e-5, atol=1e-6, msg=what)
        assert int(opt.schedule_index) == applied, f"{what}: schedule index"
        for i, (p, r) in enumerate(zip(ours, ref)):
            rtol = LOW_PRECISION_RTOL.get(p.dtype, 1e-5)
            torch.testing.assert_close(p.detach().to(r.dtype), r.detach(), rtol=rtol, atol=1e-6,
                                       msg=lambda m, i=i: f"{what}, param {i} {case.params[i]}: {m}")
            ts, fs = topt.state.get(r, {}), opt.state.get(p, {})
            if not ts and fs:  # AMP skipped its first update: state made, nothing applied (torch makes none)
                assert int(fs["step"]) == 0 and not any(v.any() for k, v in fs.items() if k != "step"), what
                continue
            assert ts.keys() == fs.keys(), f"{what}, param {i}: state keys {sorted(fs)} vs torch {sorted(ts)}"
            for key, value in ts.items():
                if key == "step":
                    assert int(fs[key]) == int(value), f"{what}, param {i}: step {int(fs[key])} vs {int(value)}"
                else:  # atol: one float32 ulp at the gradients' scale (moments can cancel to ~1e-4 while
                    # their inputs are O(1), so a one-ulp difference in the clip coefficient shows there)
                    torch.testing.assert_close(fs[key], value, rtol=1e-5, atol=1e-7,
                                               msg=lambda m, i=i, key=key: f"{what}, param {i} {key}: {m}")


INTERPRETED = not CUDA  # triton without a GPU: each launch is interpreted in Python, keep examples few and small


def _triton_reason() -> str | None:
    """Why triton cannot run here (None: it can). Without a GPU it runs under the interpreter, which is chosen
    when triton and the kernels are first imported: that import happens here, with TRITON_INTERPRET=1 set for
    it alone (test_triton_backend.py does the same)."""
    saved = os.environ.get("TRITON_INTERPRET")
    if INTERPRETED:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return backends.unavailable("triton", DEVICE)
    finally:
        if INTERPRETED and saved is None:
            del os.environ["TRITON_INTERPRET"]
        elif INTERPRETED:
            os.environ["TRITON_INTERPRET"] = saved


TRITON_REASON = _triton_reason()  # first: checking the compiled backends may import triton (through torch)
COMPILED = [name for name in ("cpu", "cuda") if backends.unavailable(name, DEVICE) is None]
EXAMPLES = 100  # per CPU backend; a mutant of the reference is caught within these (tests/test_mutation.py)
PROPERTY = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture
def triton_here(monkeypatch: pytest.MonkeyPatch) -> None:
    if TRITON_REASON is not None:
        pytest.skip(f"triton cannot run here: {TRITON_REASON}")
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("backend", ["torch", *COMPILED])
@settings(PROPERTY, max_examples=EXAMPLES)
@given(case=cases())
def test_parity_with_torch(backend: str, case: Case) -> None:
    check_case(backend, case)


@pytest.mark.usefixtures("triton_here")
@settings(PROPERTY, max_examples=8 if INTERPRETED else EXAMPLES)
@given(case=cases(small=INTERPRETED))
def test_parity_with_torch_triton(case: Case) -> None:
    check_case("triton", case)
