"""The CUDA fast path (``fusedlr.fast_step`` on a backend with ``fast_path``, ``fusedlr._C.StepPlan.launch``): its
steps are bit for bit the op path's folded steps (params, moments, steps, schedule index, norm, applied LR,
GradScaler's found_inf and scale), its device tables follow every change of a pointer, it steps aside on anything
the plan does not hold, and it matches torch's AdamW recipe.

Without a GPU it runs through the host Launchers table of the CUDA kernels built for the CPU
(tests/cuda_on_host.py's ``EmulatedCudaBackend``: the real kernels and launchers, an upload that is a memcpy),
against the same backend's op path. The last test runs the real CUDA backend when there is a GPU."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import fusedlr
from fusedlr import extension, fast_step

sys.path.insert(0, str(Path(__file__).parent))
from cuda_on_host import EmulatedCudaBackend, cuda_include, fusedlr_kernels  # noqa: E402
from fast_path_probe import fast_steps  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        extension.load_error() is not None or not hasattr(extension._C, "StepPlan"),
        reason="needs the compiled extension with fusedlr._C.StepPlan",
    ),
    pytest.mark.filterwarnings("ignore:GradScaler is going to stop:FutureWarning"),
]

SCHED = fusedlr.get_schedule("cosine", num_warmup_steps=3, num_training_steps=40)
STEPS = 10
INF_STEPS = (3, 7)

World = tuple[list[torch.nn.Parameter], fusedlr.AdamW, "torch.amp.GradScaler | None"]
Mutate = Callable[[int, list[torch.nn.Parameter], fusedlr.AdamW], None]


def _backend(grid: int = 3) -> EmulatedCudaBackend:
    if cuda_include() is None:
        pytest.skip("no CUDA headers (nvcc on PATH): cannot build the CUDA kernels for the host")
    shim = fusedlr_kernels()
    shim.configure(0)
    return EmulatedCudaBackend(shim, grid)


def _emulated(groups: list[dict], backend: EmulatedCudaBackend | None = None, **kw: object) -> fusedlr.AdamW:
    """A fusedlr.AdamW on the host emulation of the CUDA backend."""
    opt = fusedlr.AdamW(groups, backend="torch", **kw)
    opt._step_cache.update(impl=backend or _backend(), impl_device=torch.device("cpu"))
    return opt


def _world(dtype: torch.dtype = torch.float32, **group: object) -> Callable[[], World]:
    """Two param groups (the first with ``group``'s options), ``dtype`` params and a float32 one (in the second),
    clipping, a schedule and a GradScaler."""

    def build() -> World:
        shapes = [(5, 3), (7,), (1,), (4, 4), (300,), (3, 2)]
        dtypes = [dtype if i != 3 else torch.float32 for i in range(len(shapes))]
        params = [torch.nn.Parameter(torch.randn(*s).to(dt)) for s, dt in zip(shapes, dtypes)]
        groups = [{"params": params[:3], **group}, {"params": params[3:], "lr": 3e-2, "weight_decay": 0.0}]
        opt = _emulated(groups, lr=1e-2, schedule=SCHED, max_grad_norm=0.5, seed=3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
        scaler.scale(torch.ones(()))  # as scaling the first loss does: creates the scale
        return params, opt, scaler

    return build


def _grads(params: list[torch.nn.Parameter], i: int, scale: float, keep: list[torch.Tensor], inf: bool = True) -> None:
    """New gradient tensors of step ``i`` times ``scale`` (``inf``: an inf in one at INF_STEPS); ``keep`` holds every
    gradient ever made, so that each step's lie at new addresses."""
    gen = torch.Generator().manual_seed(1000 + i)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)
        keep.append(p.grad)
    if inf and i in INF_STEPS:
        params[3].grad.view(-1)[1] = float("inf")


def _snapshot(params: list[torch.nn.Parameter], opt: fusedlr.AdamW, scaler: torch.amp.GradScaler | None) -> list:
    """Params, their states, norm, applied LRs, schedule index and GradScaler's scale (when there is one)."""
    out: list = []
    for p in params:
        out.append(p.detach().clone())
        for _, v in sorted(opt.state[p].items()):
            out.append(v.clone() if isinstance(v, torch.Tensor) else v)
    cpu = torch.device("cpu")
    out += [opt.grad_norm.clone(), opt._applied_lr_buffer(cpu).clone(), opt.schedule_index.clone()]
    return out + ([] if scaler is None else [scaler.get_scale()])


def _run(build: Callable[[], World], fast: bool, mutate: Mutate | None = None) -> tuple[list, int]:
    """Snapshots after each step (with GradScaler's found_inf of the step), and how many steps the fast path took."""
    with fast_steps(fast) as taken:
        torch.manual_seed(0)
        params, opt, scaler = build()
        keep: list[torch.Tensor] = []
        snaps = []
        for i in range(STEPS):
            _grads(params, i, 1.0 if scaler is None else scaler.get_scale(), keep, inf=scaler is not None)
            if mutate is not None:
                mutate(i, params, opt)
            found = []
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                found = [t.clone() for t in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values()]
                scaler.update()
            snaps.append(found + _snapshot(params, opt, scaler))
    return snaps, taken[0]


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        else:
            assert x == y


def _check(build: Callable[[], World], mutate: Mutate | None = None, min_fast: int = STEPS - 1) -> None:
    """The same steps with and without the fast path are bitwise equal; the fast path took ``min_fast`` or more."""
    fast, taken = _run(build, True, mutate)
    slow, none = _run(build, False, mutate)
    assert none == 0 and taken >= min_fast, (taken, none)
    for a, b in zip(fast, slow):
        _assert_same(a, b)


@pytest.mark.parametrize(
    "dtype, group",
    [
        (torch.float32, {}),
        (torch.float32, {"amsgrad": True}),
        (torch.bfloat16, {}),
        (torch.bfloat16, {"master_weights": True, "amsgrad": True}),
        (torch.bfloat16, {"stochastic_rounding": True, "state_dtype": torch.bfloat16}),
        (torch.float64, {"maximize": True}),
    ],
    ids=["fp32", "fp32-amsgrad", "bf16", "bf16-master-amsgrad", "bf16-sr-bf16-moments", "fp64-maximize"],
)
def test_fast_steps_equal_the_op_path(dtype: torch.dtype, group: dict) -> None:
    """Clipping, GradScaler (inf gradients at INF_STEPS: skipped steps), a schedule and two groups; every step but
    the first (which builds the plan) on the fast path."""
    _check(_world(dtype, **group))


@pytest.mark.parametrize("amp", [True, False], ids=["amp", "no-amp"])
def test_a_tensor_lr_and_a_constant_lr_without_clipping_equal_the_op_path(amp: bool) -> None:
    """Without clipping: pass 1 for GradScaler only, or no pass 1 at all (no AMP, no inf gradient)."""

    def build() -> World:
        params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 5, 9000, (4, 4))]
        groups = [{"params": params[:2], "lr": torch.tensor(2e-2, dtype=torch.float64)}, {"params": params[2:]}]
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4) if amp else None
        if scaler is not None:
            scaler.scale(torch.ones(()))
        return params, _emulated(groups, lr=1e-2), scaler

    _check(build)


def _three_groups(backend: EmulatedCudaBackend | None = None, clip: bool = True, amp: bool = True) -> World:
    """Three param groups of float32 params (one launch set) differing in every hyperparameter, one with a tensor
    LR and one maximizing; clipping, a schedule and a GradScaler (each unless turned off)."""
    params = [torch.nn.Parameter(torch.randn(*s)) for s in [(5, 3), (7,), (1,), (4, 4), (300,), (3, 2), (9000,)]]
    groups = [
        {"params": params[:2], "lr": torch.tensor(2e-2, dtype=torch.float64), "betas": (0.8, 0.99)},
        {"params": params[2:4], "lr": 3e-2, "eps": 1e-6, "weight_decay": 0.0},
        {"params": params[4:], "betas": (0.95, 0.9), "eps": 1e-7, "weight_decay": 0.3, "maximize": True},
    ]
    opt = _emulated(groups, backend, lr=1e-2, schedule=SCHED, max_grad_norm=0.5 if clip else None, seed=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3) if amp else None
    if scaler is not None:
        scaler.scale(torch.ones(()))
    return params, opt, scaler


def test_three_groups_in_one_launch_set_equal_the_op_path() -> None:
    """Three groups whose buckets form one launch set: the fast path's one set launch per step (clipping,
    GradScaler with inf gradients at INF_STEPS, a tensor LR) equals the op path's bit for bit."""
    _check(_three_groups)


@pytest.mark.parametrize("clip, amp, launches", [(True, True, 2), (False, False, 1)], ids=["amp-clip", "plain"])
def test_a_fast_step_of_three_groups_is_one_update_launch(clip: bool, amp: bool, launches: int) -> None:
    """Issue 8 item 2 on the fast path: a step of three groups of one dtype launches pass 1 once (when clipping or
    AMP need it) and pass 2 once, through the Launchers table."""
    backend = _backend()
    params, opt, scaler = _three_groups(backend, clip, amp)
    keep: list[torch.Tensor] = []
    counts = []
    for i in range(4):
        _grads(params, i, 1.0 if scaler is None else scaler.get_scale(), keep, inf=False)
        before = backend.launch_count()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        counts.append(backend.launch_count() - before)
    assert counts == [0] + [launches] * 3  # the first step builds the plan on the op path


def test_op_path_after_fast_steps_finds_the_set_table_uploaded() -> None:
    """A graph captured after eager steps replays the op path's launch on the tables the fast path left: an op-path
    step (the fast path declined, as under capture) with the last fast step's gradients copies no set table."""
    backend = _backend()
    params, opt, scaler = _three_groups(backend)
    keep: list[torch.Tensor] = []
    for i in range(3):
        _grads(params, i, scaler.get_scale(), keep, inf=False)
        scaler.step(opt)
        scaler.update()
    assert backend.set_uploads == 1 and opt._step_cache["fast"].native is not None  # the first (op path) step's
    plan = opt._step_cache["plan"]
    (members,) = opt._step_cache["launch_sets"][2]
    assert len(members) == 3
    table, host = plan.buckets[members[0]][1].cache["emu_update_set_table"]
    assert torch.equal(table, host)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast_step, "ENABLED", False)
        scaler.step(opt)
        scaler.update()
    assert backend.set_uploads == 1
    assert int(opt.schedule_index) == 4


def test_new_gradient_storage_every_step_is_uploaded() -> None:
    """zero_grad(set_to_none=True) and gradients at new addresses every step: each launch set's table holds them (the
    host mirror and the table the kernels read), and the steps equal the op path's."""
    build = _world()
    params, opt, scaler = build()
    keep: list[torch.Tensor] = []
    for i in range(4):
        opt.zero_grad(set_to_none=True)
        _grads(params, i, scaler.get_scale(), keep)
        scaler.step(opt)
        scaler.update()
        if i == 0:
            continue
        plan = opt._step_cache["plan"]
        for members in opt._step_cache["launch_sets"][2]:  # a set of one bucket has the bucket's table
            key = "emu_update_table" if len(members) == 1 else "emu_update_set_table"
            table, host = plan.buckets[members[0]][1].cache[key]
            assert torch.equal(table, host)
            idx = [j for i in members for j in plan.buckets[i][2]]
            assert host[1 : 7 * len(idx) : 7].tolist() == [plan.flat[j].grad.data_ptr() for j in idx]

    def zero_grad(i: int, params: list[torch.nn.Parameter], opt: fusedlr.AdamW) -> None:
        grads = [p.grad for p in params]
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g.clone()

    _check(_world(), zero_grad)


def test_p_data_replaced_updates_the_new_storage() -> None:
    """``p.data = new tensor`` after step 2: the plan is rebuilt with its tables, and the fast steps after it update
    the new storage as the op path does."""

    def mutate(i: int, params: list[torch.nn.Parameter], opt: fusedlr.AdamW) -> None:
        if i == 2:
            params[0].data = params[0].data * 2

    _check(_world(), mutate, min_fast=STEPS - 2)


def test_gradients_of_another_layout_or_dtype_equal_the_op_path() -> None:
    """A broadcast gradient (stride 0: pass 1 and pass 2 read copies), one laid out unlike its param (copied for
    pass 2), then one of another dtype (the plan changes: the reference updates that bucket), then the usual ones."""

    def mutate(i: int, params: list[torch.nn.Parameter], opt: fusedlr.AdamW) -> None:
        if i == 4:
            params[0].grad = torch.randn(1, 3).expand(5, 3)
            params[3].grad = torch.randn(4, 4).t()
        if i == 6:
            params[1].grad.data = params[1].grad.double()  # (assigning .grad must keep the dtype)

    _check(_world(), mutate, min_fast=STEPS - 3)


def test_a_bad_gradient_after_fast_steps_is_refused_before_anything_changes() -> None:
    params, opt, scaler = _world()()
    keep: list[torch.Tensor] = []
    for i in range(3):
        _grads(params, i, scaler.get_scale(), keep)
        scaler.step(opt)
        scaler.update()
    assert opt._step_cache["fast"].native is not None
    _grads(params, 3, 1.0, keep)
    params[4].grad.data = torch.ones(2)
    before = _snapshot(params, opt, scaler)
    with pytest.raises(RuntimeError, match="parameter 4"):
        opt.step()
    _assert_same(before, _snapshot(params, opt, scaler))


@pytest.mark.parametrize("case", ["history", "float64 grad_scale"])
def test_steps_the_folded_op_path_does_not_take_keep_the_op_path(case: str) -> None:
    """With ``history=`` or a ``grad_scale`` attribute that is not float32 the op path does not fold, and the fast
    path (which runs the folded step) steps aside every step."""

    def build() -> World:
        params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 5, 9)]
        opt = _emulated([{"params": params}], lr=1e-2, max_grad_norm=0.5, history=4 if case == "history" else None)
        return params, opt, None

    def mutate(i: int, params: list[torch.nn.Parameter], opt: fusedlr.AdamW) -> None:
        if case != "history":
            opt.grad_scale = torch.tensor(4.0, dtype=torch.float64)
            opt.found_inf = torch.tensor(0.0)

    fast, taken = _run(build, True, mutate)
    slow, _ = _run(build, False, mutate)
    assert taken == 0
    for a, b in zip(fast, slow):
        _assert_same(a, b)


def test_fast_steps_launch_nothing_through_the_op_path() -> None:
    """After the first step every launch goes through the Launchers table: the backend's op path raises."""
    params, opt, scaler = _world()()
    keep: list[torch.Tensor] = []
    _grads(params, 0, scaler.get_scale(), keep)
    scaler.step(opt)
    scaler.update()
    impl = opt._step_cache["impl"]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the op path ran")

    before = [p.detach().clone() for p in params]
    with pytest.MonkeyPatch.context() as mp:
        for name in ("grad_stats", "grad_stats_set", "adamw_update", "prepare_update"):
            mp.setattr(impl, name, refuse)
        for i in range(1, 3):
            _grads(params, i, scaler.get_scale(), keep)
            scaler.step(opt)
            scaler.update()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
    assert int(opt.schedule_index) == 3


def test_fast_path_matches_torch_adamw_recipe() -> None:
    """torch.optim.AdamW + clip_grad_norm_ + LambdaLR + GradScaler (unscale_ before clipping; the schedule advances
    on applied steps, as fusedlr's index)."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n)) for n in (4, 9, 1, 300)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = _emulated([{"params": ours}], lr=1e-2, weight_decay=0.1, amsgrad=True, max_grad_norm=0.3, schedule=SCHED)
    topt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, amsgrad=True)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda k: SCHED(k))
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3) for _ in range(2)]
    for s in scalers:
        s.scale(torch.ones(()))
    keep: list[torch.Tensor] = []
    for i in range(STEPS):
        _grads(ours, i, scalers[0].get_scale(), keep)
        _grads(ref, i, scalers[1].get_scale(), keep)
        scalers[0].step(opt)
        scalers[0].update()
        scalers[1].unscale_(topt)
        torch.nn.utils.clip_grad_norm_(ref, 0.3)
        scalers[1].step(topt)
        skipped = sum(float(t) for t in scalers[1]._per_optimizer_states[id(topt)]["found_inf_per_device"].values())
        scalers[1].update()
        if not skipped:
            sched.step()
        torch.testing.assert_close(ours, ref)
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert opt._step_cache["fast"].native is not None


class _Launchers(ctypes.Structure):
    """csrc/cuda/launchers.h's table."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in (
            "grad_stats", "adamw_update", "adamw_update_set", "grad_stats_grid", "adamw_update_grid",
            "current_stream", "upload", "error_string",
        )
    ]


_UPLOAD = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
)


def test_a_table_not_uploaded_after_a_pointer_changed_is_caught() -> None:
    """Mutation check: launchers whose upload skips every table it uploaded once (new gradient addresses are never
    seen by the kernels) make the comparison with the op path fail."""
    backend = _backend()
    real = _Launchers.from_address(backend.launchers())
    real_upload = _UPLOAD(real.upload)
    seen: set[int] = set()

    def upload_once(dst: int, host: int, size: int, device: int, stream: int) -> int:
        if dst in seen:
            return 0
        seen.add(dst)
        return real_upload(dst, host, size, device, stream)

    mutant = _Launchers(*(getattr(real, name) for name, _ in _Launchers._fields_))
    callback = _UPLOAD(upload_once)
    mutant.upload = ctypes.cast(callback, ctypes.c_void_p).value

    class Mutant(EmulatedCudaBackend):
        def launchers(self) -> int:
            return ctypes.addressof(mutant)

    def build() -> World:
        params, _, scaler = _world()()
        groups = [{"params": params[:3]}, {"params": params[3:], "lr": 3e-2, "weight_decay": 0.0}]
        opt = _emulated(groups, Mutant(backend.shim, backend.grid), lr=1e-2, schedule=SCHED, max_grad_norm=0.5, seed=3)
        return params, opt, scaler

    with pytest.raises(AssertionError):
        _check(build)
    assert seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_fast_path_is_sync_free_and_equals_the_op_path() -> None:
    """The real CUDA backend: fast steps with torch.cuda.set_sync_debug_mode("error") equal the op path's, and a CUDA
    graph captured after them replays the op path's step (its set table uploaded by the fast steps)."""
    from fusedlr.extension import cuda

    if cuda.available(torch.device("cuda")) is not None:
        pytest.skip(cuda.available(torch.device("cuda")))

    def run(fast: bool) -> tuple[list, int]:
        with fast_steps(fast) as taken:
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (3, 5000, 70_001)]
            params.append(torch.nn.Parameter(torch.randn(64, device="cuda", dtype=torch.bfloat16)))
            groups = [  # a launch set of the two fp32 groups' buckets, and one of the bf16 bucket alone
                {"params": params[:2]},
                {"params": params[2:3], "lr": 3e-2, "weight_decay": 0.0},
                {"params": params[3:], "amsgrad": True},
            ]
            opt = fusedlr.AdamW(groups, lr=1e-2, schedule=SCHED, max_grad_norm=0.5, backend="cuda")
            scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8, growth_interval=3)
            scaler.scale(torch.ones((), device="cuda"))
            snaps = []
            try:
                for i in range(STEPS):
                    if i == 1:  # the first step builds the plan and the states
                        torch.cuda.set_sync_debug_mode("error")
                    gen = torch.Generator(device="cuda").manual_seed(1000 + i)
                    for p in params:
                        p.grad = torch.randn(p.shape, generator=gen, device="cuda").to(p.dtype) * scaler._scale
                    if i in INF_STEPS:
                        params[1].grad[7] = float("inf")
                    scaler.step(opt)
                    scaler.update()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            for p in params:
                snaps += [p.detach().cpu()] + [v.cpu() for _, v in sorted(opt.state[p].items())]
            snaps += [opt.grad_norm.cpu(), opt._applied_lr_buffer(params[0].device).cpu(), opt.schedule_index.cpu()]
            # a graph captured after a fast step (the op path's tables are the ones the fast path uploaded)
            static = [p.grad.clone() for p in params]
            for p, g in zip(params, static):
                p.grad = g
            opt.step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            graph.replay()
            torch.cuda.synchronize()
            snaps += [p.detach().cpu() for p in params]
        return snaps, taken[0]

    fast, taken = run(True)
    slow, none = run(False)
    assert none == 0 and taken >= STEPS - 1
    for x, y in zip(fast, slow):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
