"""The eager fast path of the ``cpu`` backend (``fusedlr.fast_step``, ``fusedlr._C.StepPlan``): every step it
takes is bit for bit the step the op path takes (params, moments, steps, norm, applied LR, schedule index,
version counters), it steps aside whenever the plan changes, and it matches torch.optim.AdamW."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedlr
from fast_path_probe import fast_steps
from fusedlr import extension, fast_step

pytestmark = [
    pytest.mark.skipif(
        extension.load_error() is not None or not hasattr(extension._C, "StepPlan"),
        reason="needs the compiled extension with fusedlr._C.StepPlan",
    ),
    pytest.mark.filterwarnings("ignore:GradScaler is going to stop:FutureWarning"),
]

SCHED = fusedlr.get_schedule("cosine", num_warmup_steps=3, num_training_steps=40)
STEPS = 8

World = tuple[list[torch.Tensor], fusedlr.AdamW]


def _mixed() -> World:
    """Two groups, fp32 and bf16 params (four buckets), clipping and a schedule."""
    params = [torch.nn.Parameter(torch.randn(*shape, dtype=dt)) for shape, dt in [
        ((5, 3), torch.float32), ((7,), torch.bfloat16), ((1,), torch.float32),
        ((4, 4), torch.float32), ((6,), torch.bfloat16), ((3, 2), torch.float64),
    ]]
    groups = [{"params": params[:3]}, {"params": params[3:], "lr": 3e-2, "weight_decay": 0.0}]
    return params, fusedlr.AdamW(groups, lr=1e-2, schedule=SCHED, max_grad_norm=0.5, backend="cpu")


def _options(**kw: object) -> Callable[[], World]:
    def build() -> World:
        params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 5, 1, 8)]
        options = {"lr": 1e-2, **kw}
        if isinstance(options["lr"], torch.Tensor):  # each run fills its own
            options["lr"] = options["lr"].clone()
        return params, fusedlr.AdamW(params, backend="cpu", **options)

    return build


def _grads(params: list[torch.Tensor], i: int) -> None:
    """New gradient tensors (as ``zero_grad(set_to_none=True)`` and a backward give)."""
    gen = torch.Generator().manual_seed(1000 + i)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)


def _snapshot(params: list[torch.Tensor], opt: fusedlr.AdamW, versions: bool = True) -> list[torch.Tensor | int]:
    """Params, their state, norm, applied LRs, schedule index and (``versions``) the version counters."""
    out: list[torch.Tensor | int] = []
    for p in params:
        out += [p.detach().clone()] + [p._version] * versions
        for _, v in sorted(opt.state[p].items()):
            out += [v.clone()] + [v._version] * versions if isinstance(v, torch.Tensor) else [v]
    return out + [opt.grad_norm.clone(), opt._applied_lr_buffer(torch.device("cpu")).clone(), opt.schedule_index.clone()]


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        else:
            assert x == y


Mutate = Callable[[int, list[torch.Tensor], fusedlr.AdamW], None]


def _step(opt: fusedlr.AdamW) -> list:
    opt.step()
    return []


def _run(
    build: Callable[[], World], fast: bool, mutate: Mutate | None, do_step: Callable[[fusedlr.AdamW], list]
) -> tuple[list, int]:
    """Snapshots after each step (with what ``do_step`` returns), and how many steps the fast path took."""
    with fast_steps(fast) as taken:
        torch.manual_seed(0)
        params, opt = build()
        snaps = []
        for i in range(STEPS):
            _grads(params, i)
            if mutate is not None:
                mutate(i, params, opt)
            extra = do_step(opt)
            snaps.append(extra + _snapshot(params, opt))
    return snaps, taken[0]


def _check(
    build: Callable[[], World],
    mutate: Mutate | None = None,
    min_fast: int = STEPS - 2,
    do_step: Callable[[fusedlr.AdamW], list] = _step,
) -> None:
    """The same steps with and without the fast path are bitwise equal; the fast path took ``min_fast`` or more."""
    fast, taken = _run(build, True, mutate, do_step)
    slow, none = _run(build, False, mutate, do_step)
    assert none == 0 and taken >= min_fast
    for a, b in zip(fast, slow):
        _assert_same(a, b)


def test_mixed_dtypes_groups_clipping_and_schedule_match_the_op_path() -> None:
    _check(_mixed)


@pytest.mark.parametrize(
    "kw",
    [
        {"amsgrad": True},
        {"maximize": True, "weight_decay": 0.3},
        {"amsgrad": True, "maximize": True, "max_grad_norm": 1e-3},
        {"lr": torch.tensor(3e-2)},
        {"lr": torch.tensor(3e-2, dtype=torch.float64), "schedule": SCHED},
        {"history": 3, "max_grad_norm": 0.1, "schedule": SCHED},
    ],
    ids=["amsgrad", "maximize", "amsgrad-maximize-clip", "tensor-lr-f32", "tensor-lr-f64-schedule", "history"],
)
def test_options_match_the_op_path(kw: dict) -> None:
    def mutate(i: int, params: list[torch.Tensor], opt: fusedlr.AdamW) -> None:
        lr = opt.param_groups[0]["lr"]
        if isinstance(lr, torch.Tensor) and i == 4:
            lr.fill_(1e-3)  # filled in place: read by the kernel

    _check(_options(**kw), mutate)


def test_history_matches_the_op_path() -> None:
    records = []
    for fast in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not fast:
                mp.setattr(fast_step, "ENABLED", False)
            torch.manual_seed(0)
            params, opt = _options(history=4, max_grad_norm=0.1, schedule=SCHED)()
            for i in range(6):
                _grads(params, i)
                opt.step()
            records.append(opt.read_history())
    assert records[0] == records[1]


@pytest.mark.filterwarnings("ignore:fusedlr.AdamW\\(schedule=...\\) applies:UserWarning")
def test_group_values_changed_between_steps_are_applied() -> None:
    def mutate(i: int, params: list[torch.Tensor], opt: fusedlr.AdamW) -> None:
        group = opt.param_groups[1]
        if i == 3:
            group["lr"] = 5e-3
            group["betas"] = (0.8, 0.99)
        if i == 5:
            group["weight_decay"] = 0.5
            group["eps"] = 1e-3

    _check(_mixed, mutate)


def test_an_invalid_group_value_is_refused_before_anything_changes() -> None:
    params, opt = _options()()
    for i in range(2):
        _grads(params, i)
        opt.step()
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    before = _snapshot(params, opt)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        opt.step()
    _assert_same(before, _snapshot(params, opt))


def test_grads_appearing_and_disappearing_match_the_op_path() -> None:
    def mutate(i: int, params: list[torch.Tensor], opt: fusedlr.AdamW) -> None:
        if i in (2, 3):
            params[1].grad = None
        if i == 5:
            params[4].grad = None
            params[0].grad = None

    _check(_mixed, mutate, min_fast=STEPS - 5)


def test_noncontiguous_grads_match_the_op_path() -> None:
    def mutate(i: int, params: list[torch.Tensor], opt: fusedlr.AdamW) -> None:
        if i % 2:
            params[3].grad = params[3].grad.t().contiguous().t()  # transposed layout: copied by the kernels
            params[0].grad = torch.randn(10, 3)[::2]  # not dense: copied for both passes

    _check(_mixed, mutate)


def test_steps_differing_within_a_bucket_match_the_op_path() -> None:
    """A param that missed steps rejoins its bucket with a smaller step number, between and beside params of
    another: each tensor's bias corrections follow its own step (the kernels compute them once per run of equal
    steps)."""

    def mutate(i: int, params: list[torch.Tensor], opt: fusedlr.AdamW) -> None:
        if i in (1, 2):
            params[1].grad = None
        if i == 3:
            params[3].grad = None

    _check(_options(max_grad_norm=1.0, schedule=SCHED), mutate, min_fast=STEPS - 6)
    params, opt = _options()()
    for i in range(STEPS):
        _grads(params, i)
        mutate(i, params, opt)
        opt.step()
    steps = [int(opt.state[p]["step"]) for p in params]
    assert steps == [STEPS, STEPS - 2, STEPS, STEPS - 1]


def test_gradients_of_another_layout_or_dtype_after_fast_steps_match_the_op_path() -> None:
    """After fast steps, gradients the plan's record of their param does not describe: a broadcast one (stride
    0, read through a copy), one laid out unlike its param (copied for pass 2 only), one of another dtype (the
    plan changes) and, the step after, the usual ones again."""

    def mutate(i: int, params: list[torch.Tensor], opt: fusedlr.AdamW) -> None:
        if i == 3:
            params[0].grad = torch.randn(1, 3).expand(5, 3)
            params[3].grad = torch.randn(4, 4).t()
        if i == 5:
            params[2].grad.data = params[2].grad.double()  # (assigning .grad must keep the dtype)

    _check(_mixed, mutate, min_fast=STEPS - 4)


def test_copy_on_write_params_and_states_are_written_apart_from_their_sources() -> None:
    """A param and a moment that become lazy (copy-on-write) clones between fast steps share their sources' data
    until written: the step writes copies (the sources keep their values) and matches the op path."""
    sources: list[tuple[torch.Tensor, torch.Tensor]] = []

    def mutate(i: int, params: list[torch.Tensor], opt: fusedlr.AdamW) -> None:
        if i == 3:
            for t in (params[0], opt.state[params[2]]["exp_avg"]):
                sources.append((t.data, t.detach().clone()))
                t.data = torch._lazy_clone(t.data)

    _check(_mixed, mutate, min_fast=STEPS - 3)
    assert len(sources) == 4
    for source, value in sources:
        torch.testing.assert_close(source, value, rtol=0, atol=0)


def test_a_sparse_gradient_after_fast_steps_is_refused_as_the_op_path_refuses_it() -> None:
    for fast in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not fast:
                mp.setattr(fast_step, "ENABLED", False)
            params, opt = _mixed()
            for i in range(3):
                _grads(params, i)
                opt.step()
            _grads(params, 3)
            params[2].grad = params[2].grad.to_sparse()
            before = _snapshot(params, opt)
            with pytest.raises(RuntimeError, match="sparse gradients.*parameter 2; nothing was updated"):
                opt.step()
            _assert_same(before, _snapshot(params, opt))


def test_a_bucket_large_enough_for_threads_matches_the_op_path() -> None:
    """Above cpu::kParallelMin elements the kernels split the work over threads (the step releases the GIL)."""

    def build() -> World:
        params = [torch.nn.Parameter(torch.randn(n)) for n in (40_000, 3, 20_000)]
        return params, fusedlr.AdamW(params, lr=1e-2, schedule=SCHED, max_grad_norm=1.0, backend="cpu")

    _check(build)


def test_p_data_replaced_state_cleared_and_group_added_match_the_op_path() -> None:
    def mutate(i: int, params: list[torch.Tensor], opt: fusedlr.AdamW) -> None:
        if i == 2:
            params[0].data = params[0].data * 2  # new storage
        if i == 4:
            opt.state.clear()
        if i == 5:
            new = torch.nn.Parameter(torch.linspace(-1, 1, 9))
            opt.add_param_group({"params": [new], "lr": 1e-3, "amsgrad": True})
            params.append(new)
            _grads(params, 100 + i)

    _check(_mixed, mutate, min_fast=STEPS - 6)


def test_load_state_dict_mid_run_matches_the_op_path() -> None:
    saved: dict = {}

    def mutate(i: int, params: list[torch.Tensor], opt: fusedlr.AdamW) -> None:
        if i == 2:
            saved["sd"] = copy.deepcopy(opt.state_dict())
        if i == 5:
            opt.load_state_dict(saved["sd"])

    _check(_mixed, mutate, min_fast=STEPS - 4)


@pytest.mark.parametrize("contract", ["grad_scaler", "attributes"])
def test_amp_skips_match_the_op_path(contract: str) -> None:
    scalers: list[torch.amp.GradScaler] = []

    def build() -> World:
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2))
        scalers[-1].scale(torch.ones(()))  # as scaling the first loss does: creates the scale
        return _mixed()

    def mutate(i: int, params: list[torch.Tensor], opt: fusedlr.AdamW) -> None:
        scale = scalers[-1].get_scale() if contract == "grad_scaler" else 64.0
        for p in params:
            p.grad.mul_(scale)
        if i in (2, 5):
            params[3].grad[0, 1] = float("inf") if i == 2 else float("nan")
        if contract == "attributes":
            opt.grad_scale = torch.tensor(scale)
            opt.found_inf = torch.tensor(1.0 if i in (2, 5, 6) else 0.0)

    def do_step(opt: fusedlr.AdamW) -> list:
        if contract == "attributes":
            opt.step()
            return []
        scalers[-1].step(opt)
        scalers[-1].update()
        return [scalers[-1].get_scale()]

    _check(build, mutate, do_step=do_step)


@pytest.mark.parametrize(
    "kw",
    [
        {"master_weights": True},
        {"master_weights": "remainder", "amsgrad": True},
        {"stochastic_rounding": True},
        {"state_dtype": torch.bfloat16, "stochastic_rounding": True, "amsgrad": True},
        {"master_weights": True, "state_dtype": torch.bfloat16},
    ],
    ids=["master", "remainder-amsgrad", "sr", "bf16-moments-sr-amsgrad", "master-bf16-moments"],
)
def test_low_precision_buckets_equal_the_op_path(kw: dict) -> None:
    """bf16 params (and fp16 with a master; an fp32 param in a default-mode group beside them) in each
    low-precision mode, clipping, a schedule and an AMP skip: masters, remainders and moments bit for bit the
    op path's, version counters included."""
    scalers: list[torch.amp.GradScaler] = []

    def build() -> World:
        params = [torch.nn.Parameter(torch.randn(*shape, dtype=dt)) for shape, dt in [
            ((5, 3), torch.bfloat16), ((7,), torch.bfloat16), ((1,), torch.float32), ((4, 4), torch.float16),
        ]]
        if kw.get("master_weights") is not True:  # fp16 params take a full master only
            params[3] = torch.nn.Parameter(params[3].detach().to(torch.bfloat16))
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0**8))
        scalers[-1].scale(torch.ones(()))
        groups = [{"params": [params[0], params[1], params[3]], **kw}, {"params": [params[2]]}]  # fp32: default mode
        opt = fusedlr.AdamW(groups, lr=1e-2, schedule=SCHED, max_grad_norm=0.5, backend="cpu", seed=3)
        return params, opt

    def mutate(i: int, params: list[torch.Tensor], opt: fusedlr.AdamW) -> None:
        for p in params:
            p.grad.mul_(scalers[-1].get_scale())
        if i == 3:
            params[0].grad[1, 1] = float("inf")

    def do_step(opt: fusedlr.AdamW) -> list:
        scalers[-1].step(opt)
        scalers[-1].update()
        return [scalers[-1].get_scale()]

    _check(build, mutate, do_step=do_step)


def test_a_bad_gradient_after_fast_steps_is_refused_before_anything_changes() -> None:
    params, opt = _mixed()
    for i in range(3):
        _grads(params, i)
        opt.step()
    _grads(params, 3)
    params[4].grad.data = torch.ones(2, dtype=torch.bfloat16)
    before = _snapshot(params, opt)
    with pytest.raises(RuntimeError, match="parameter 4"):
        opt.step()
    _assert_same(before, _snapshot(params, opt))
    params[4].grad = torch.ones(6, dtype=torch.bfloat16)
    opt.step()
    assert int(opt.schedule_index) == 4


def test_deepcopy_and_pickle_after_fast_steps() -> None:
    params, opt = _mixed()
    for i in range(3):
        _grads(params, i)
        opt.step()
    assert opt._step_cache["fast"].native is not None
    params2, opt2 = copy.deepcopy((params, opt))
    buf = io.BytesIO()
    pickle.dump((params, opt), buf)
    params3, opt3 = pickle.loads(buf.getvalue())
    for i in range(3, 7):
        for ps, o in ((params, opt), (params2, opt2), (params3, opt3)):
            _grads(ps, i)
            o.step()
    _assert_same(_snapshot(params, opt, False), _snapshot(params2, opt2, False))  # copies restart versions at 0
    _assert_same(_snapshot(params, opt, False), _snapshot(params3, opt3, False))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(opt._step_cache["fast"].native)


def test_fast_path_matches_torch_adamw() -> None:
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n)) for n in (4, 9, 1)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fusedlr.AdamW(ours, lr=1e-2, weight_decay=0.1, amsgrad=True, max_grad_norm=0.3, backend="cpu")
    topt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, amsgrad=True)
    for i in range(6):
        _grads(ours, i)
        _grads(ref, i)
        opt.step()
        torch.nn.utils.clip_grad_norm_(ref, 0.3)
        topt.step()
        torch.testing.assert_close(ours, ref)
    assert opt._step_cache["fast"].native is not None


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_fast_path_dispatches_no_fusedlr_op() -> None:
    params = [torch.nn.Parameter(torch.randn(2)) for _ in range(50)]
    opt = fusedlr.AdamW(params, lr=1e-2, schedule=SCHED, max_grad_norm=1.0, backend="cpu")
    _grads(params, 0)
    with _Ops() as first:
        opt.step()  # builds the plan: the op path
    assert any("fusedlr.adamw_update" in n for n in first.names)
    _grads(params, 1)
    before = [p.detach().clone() for p in params]
    with _Ops() as later:
        opt.step()
    assert not any(n.startswith("fusedlr.") for n in later.names), later.names
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
    assert len(later.names) < 10  # O(1) small ops, not one per tensor


def test_environment_turns_the_fast_path_off(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, taken = _run(_mixed, True, None, _step)
    monkeypatch.setattr(fast_step, "ENABLED", False)
    off, none = _run(_mixed, True, None, _step)
    assert taken >= STEPS - 2 and none == 0
    for a, b in zip(fast, off):
        _assert_same(a, b)
    read = "import fusedlr.fast_step as f; print(f.ENABLED)"
    for value, expected in (("0", "False"), ("1", "True"), (None, "True")):
        env = {k: v for k, v in os.environ.items() if k != "FUSEDLR_FAST_PATH"}
        env.update({} if value is None else {"FUSEDLR_FAST_PATH": value})
        out = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, (value, out.stderr)


def test_compile_keeps_the_op_path() -> None:
    params, opt = _options(max_grad_norm=1.0)()
    calls = []
    real = fast_step.step

    def spy(o: fusedlr.AdamW, grad_scaler: object) -> bool:
        calls.append(torch.compiler.is_compiling())
        return real(o, grad_scaler)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast_step, "step", spy)
        _grads(params, 0)
        opt.step()
        compiled = torch.compile(opt.step, backend="eager")
        _grads(params, 1)
        compiled()
    assert not any(calls)
