"""The low-precision modes (fp32 master, 16-bit remainder, stochastic rounding, bf16 moments) in the
compiled kernels: the ``cpu`` backend and the CUDA kernels run on the host ("emu", csrc/cuda/testing),
against the reference backend (``fusedlr.reference`` + ``fusedlr.precision``, the spec).

Bitwise: the kernels and the reference evaluate the AdamW formulas in different orders (the kernels
``p - lr_t / bias1 * (m / denom)``, the reference torch's ``p - m / (denom / step_size)``), and torch's
CPU ``sqrt`` is not always correctly rounded, so their float32 values may differ by a rounding. With
``beta1 = beta2 = 0`` (so ``m = g``, ``v = g * g``), an LR that is a power of two, no clipping, and
gradients growing 4x a step (so ``sqrt`` only sees this step's ``g * g``, whose root both give as ``|g|``)
every float32 value of both is the same number, so whatever the modes store (rounded to nearest,
stochastically with the counter-based RNG, split into param + remainder) must be the same bits, step
after step: masters, params, moments, over an AMP skip, several param groups (pids) and odd shapes.
With ordinary hyperparameters and clipping the stored values are compared within a rounding or two.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fusedlr
from fusedlr import extension, precision

from cuda_on_host import EmulatedCudaBackend, cuda_include, fusedlr_kernels

needs_ext = pytest.mark.skipif(extension.load_error() is not None, reason=str(extension.load_error()))
needs_host_cuda = pytest.mark.skipif(cuda_include() is None, reason="no CUDA headers (nvcc on PATH)")
BACKENDS = [pytest.param("cpu", marks=needs_ext), pytest.param("emu", marks=needs_host_cuda)]

# (param dtype, group options): every mode, and the mixes a param group may hold.
MODES = [
    (torch.bfloat16, dict(master_weights=True)),
    (torch.float16, dict(master_weights=True)),
    (torch.bfloat16, dict(master_weights="remainder")),
    (torch.bfloat16, dict(stochastic_rounding=True)),
    (torch.bfloat16, dict(state_dtype=torch.bfloat16)),
    (torch.bfloat16, dict(stochastic_rounding=True, state_dtype=torch.bfloat16)),
    (torch.bfloat16, dict(master_weights=True, stochastic_rounding=True, state_dtype=torch.bfloat16)),
    (torch.bfloat16, dict(master_weights="remainder", stochastic_rounding=True, state_dtype=torch.bfloat16)),
    (torch.float16, dict(master_weights=True, stochastic_rounding=True, state_dtype=torch.bfloat16)),
    (torch.float16, dict(stochastic_rounding=True, state_dtype=torch.bfloat16)),
    (torch.float32, dict(state_dtype=torch.bfloat16)),
    (torch.float32, dict(stochastic_rounding=True, state_dtype=torch.bfloat16)),
    (torch.float64, dict(stochastic_rounding=True, state_dtype=torch.bfloat16)),
    (torch.float64, dict(state_dtype=torch.float32)),
]
MODE_IDS = [f"{str(d)[6:]}-" + "-".join(f"{k}={v}".replace("torch.", "") for k, v in kw.items()) for d, kw in MODES]

# Odd shapes: empty, one element, a tail, several CPU items / CUDA chunks, and a channels_last tensor
# (dense but not contiguous: the RNG's element index is the offset in memory).
SHAPES = [(7, 13), (0,), (1,), (3, 5, 4, 6), (16384 + 8192 + 37,)]
CHANNELS_LAST = 3


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(SHAPES):
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if i == CHANNELS_LAST:
            t = t.to(memory_format=torch.channels_last)
        out.append(torch.nn.Parameter(t))
    return out


def set_grads(params: list[torch.Tensor], step: int, scale: float) -> None:
    """``scale`` times +-(8 + k) / 16 * 4^step, k in [0, 8): exact in every dtype, each step's at least twice
    the last's in magnitude (so that amsgrad's max is this step's v, see the module docstring)."""
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        k = (torch.randint(0, 8, p.shape, generator=g) + 8) * (torch.randint(0, 2, p.shape, generator=g) * 2 - 1)
        p.grad = (k.to(torch.float64) * (scale * 4.0**step / 16)).to(p.dtype)


def emulated(opt: fusedlr.AdamW) -> fusedlr.AdamW:
    """``opt`` updated by the CUDA kernels run on the host (a grid of 3 blocks walking several chunks)."""
    shim = fusedlr_kernels()
    shim.configure(0)
    opt._step_cache.update(impl=EmulatedCudaBackend(shim, 3), impl_device=torch.device("cpu"))
    return opt


def make_opt(backend: str, params: list[torch.Tensor], mode: dict, **kw) -> fusedlr.AdamW:
    """An optimizer with a default-mode fp32 group first (so the mode's pids do not start at 0)."""
    lead = torch.nn.Parameter(torch.linspace(-1, 1, 5))
    groups = [{"params": [lead]}, {"params": params, **mode}]
    opt = fusedlr.AdamW(groups, backend="torch" if backend == "emu" else backend, seed=1234567, **kw)
    return emulated(opt) if backend == "emu" else opt


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``'s elements in logical order (NaN compares equal to itself)."""
    return t.reshape(-1).view(torch.uint8)


def assert_same(opt: fusedlr.AdamW, ref: fusedlr.AdamW, what: str, exact: bool) -> None:
    for gi, (group, rgroup) in enumerate(zip(opt.param_groups, ref.param_groups)):
        for i, (p, q) in enumerate(zip(group["params"], rgroup["params"])):
            pairs = [("param", p.detach(), q.detach())]
            state, rstate = opt.state[p], ref.state[q]
            assert sorted(state) == sorted(rstate), f"{what}: group {gi} param {i} state keys"
            pairs += [(key, state[key], rstate[key]) for key in rstate]
            for key, a, b in pairs:
                msg = f"{what}: group {gi} param {i} {tuple(p.shape)} {key}"
                assert a.dtype == b.dtype and a.stride() == b.stride(), msg
                if exact or key in ("step", "master_remainder"):
                    if key == "master_remainder":  # the master it stores, within one float32 rounding
                        a, b = precision.join_master(p.detach(), a), precision.join_master(q.detach(), b)
                        if not exact:
                            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4,
                                                       msg=lambda m, msg=msg: f"{msg}: {m}")
                            continue
                    assert torch.equal(_bits(a), _bits(b)), msg
                elif a.dtype in (torch.bfloat16, torch.float16):  # roundings of 16-bit values drift apart
                    ulp = 2.0**-7 if a.dtype == torch.bfloat16 else 2.0**-10
                    scale = float(b.abs().max()) if b.numel() else 0.0
                    torch.testing.assert_close(a.double(), b.double(), rtol=2 * ulp, atol=4 * ulp * scale,
                                               msg=lambda m, msg=msg: f"{msg}: {m}")
                else:
                    torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4,
                                               msg=lambda m, msg=msg: f"{msg}: {m}")


EXACT = dict(lr=2.0**-7, betas=(0.0, 0.0), weight_decay=0.1)


def train(opt: fusedlr.AdamW, steps: range) -> None:
    """AMP steps with grad scale 3 (so that the unscaled grads are not round numbers, and the moments'
    rounding has work to do); step 2 has an inf gradient and is skipped."""
    params = opt.param_groups[0]["params"] + opt.param_groups[1]["params"]
    for step in steps:
        set_grads(params, step, scale=1.0)
        opt.grad_scale = torch.tensor(3.0)
        opt.found_inf = torch.tensor(1.0 if step == 2 else 0.0)
        if step == 2:
            opt.param_groups[1]["params"][0].grad[0, 0] = float("inf")
        opt.step()


def run(backend: str, dtype: torch.dtype, mode: dict, amsgrad: bool, maximize: bool, exact: bool) -> None:
    if exact:
        hyper = EXACT
    else:
        sched = fusedlr.get_schedule("cosine", num_warmup_steps=2, num_training_steps=10)
        hyper = dict(lr=3e-2, betas=(0.9, 0.99), weight_decay=0.1, max_grad_norm=3.0, schedule=sched)
    kw = dict(amsgrad=amsgrad, maximize=maximize, **hyper)
    opt, ref = make_opt(backend, make_params(dtype), mode, **kw), make_opt("torch", make_params(dtype), mode, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "updated by the torch reference backend" (nor any other warning)
        for step in range(5):
            train(opt, range(step, step + 1))
            train(ref, range(step, step + 1))
            assert_same(opt, ref, f"{backend} step {step}", exact)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, True)], ids=["plain", "amsgrad-maximize"])
def test_kernels_store_the_reference_bits(backend: str, dtype: torch.dtype, mode: dict, amsgrad: bool,
                                          maximize: bool) -> None:
    run(backend, dtype, mode, amsgrad, maximize, exact=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,mode", MODES, ids=MODE_IDS)
def test_kernels_follow_the_reference_with_ordinary_hyperparameters(backend: str, dtype: torch.dtype,
                                                                     mode: dict) -> None:
    run(backend, dtype, mode, amsgrad=True, maximize=False, exact=False)


@needs_ext
@pytest.mark.parametrize("first,second", [("cpu", "torch"), ("torch", "cpu")])
@pytest.mark.parametrize("dtype,mode", [MODES[2], MODES[6], MODES[9]], ids=[MODE_IDS[2], MODE_IDS[6], MODE_IDS[9]])
def test_a_checkpoint_moves_between_backends_and_continues_identically(first: str, second: str,
                                                                        dtype: torch.dtype, mode: dict) -> None:
    straight = make_opt("torch", make_params(dtype), mode, amsgrad=True, **EXACT)
    train(straight, range(6))
    params = make_params(dtype)
    before = make_opt(first, params, mode, amsgrad=True, **EXACT)
    train(before, range(3))
    saved = copy.deepcopy(before.state_dict())
    model = [p.detach().clone() for p in before.param_groups[0]["params"] + params]
    params = [torch.nn.Parameter(p) for p in model]
    after = make_opt(second, params[1:], mode, amsgrad=True, **EXACT)
    with torch.no_grad():
        after.param_groups[0]["params"][0].copy_(params[0])
    after.load_state_dict(saved)
    train(after, range(3, 6))
    assert_same(after, straight, f"{first} then {second}", exact=True)


@needs_ext
@pytest.mark.parametrize("master", [None, "full", "remainder"])
def test_op_schema_and_fake_take_the_low_precision_arguments(master: str | None) -> None:
    """torch.library.opcheck: the trailing arguments' schema (written tensors), fake impl and dispatch."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(5, 3, generator=g).to(torch.bfloat16), torch.randn(4, generator=g).to(torch.bfloat16)]
    kwargs: dict = dict(masters=[], remainders=[], stochastic=True, seed=7, pids=torch.tensor([3, 8]))
    if master == "full":
        kwargs["masters"] = [p.float() for p in ps]
    elif master == "remainder":
        kwargs["remainders"] = [precision.split_master(p.float() * 1.001)[1] for p in ps]
    args = (
        ps,
        [torch.randn(p.shape, generator=g).to(p.dtype) for p in ps],
        [torch.zeros_like(p) for p in ps],
        [torch.zeros_like(p) for p in ps],
        [torch.zeros_like(p) for p in ps],
        torch.tensor([1, 2]),
        torch.tensor(0),
        None,
        None,
        None,
        None,
        None,
        1e-3,
        0.9,
        0.999,
        1e-8,
        0.01,
        False,
    )
    torch.library.opcheck(torch.ops.fusedlr.adamw_update.default, args, kwargs)
