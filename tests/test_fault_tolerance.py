"""Fault tolerance in training: a checkpoint resumed in a new process continues bit-identically, and a step
interrupted by an exception (a bad gradient, an error raised from inside a backend) changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fusedlr
from fusedlr import backends, fast_step

ROOT = Path(__file__).resolve().parents[1]


CPU_BACKENDS = [name for name in ("torch", "cpu") if backends.unavailable(name, torch.device("cpu")) is None]


# One training run per backend, as a script: the same code trains straight through (saving a checkpoint on
# the way) or resumes from that checkpoint.
TRAIN = textwrap.dedent(
    """
    import json, sys, torch, fusedlr
    mode, workdir, total, save_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    results = {}
    for backend in sys.argv[5:]:
        ckpt = f"{workdir}/ckpt-{backend}.pt"
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        sched = fusedlr.get_schedule("cosine", num_warmup_steps=3, num_training_steps=total)
        opt = fusedlr.AdamW([{"params": model[0].parameters(), "weight_decay": 0.1},
                             {"params": model[2].parameters(), "lr": 2e-2, "amsgrad": True}],
                            lr=1e-2, schedule=sched, max_grad_norm=0.3, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        start = 0
        if mode == "resume":
            ck = torch.load(ckpt, weights_only=True)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            scaler.load_state_dict(ck["scaler"])
            start = ck["step"]
        for i in range(start, total):
            if mode == "straight" and i == save_at:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
                            "step": i}, ckpt)
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
            opt.zero_grad()
            scaler.scale(((model(x) - y) ** 2).mean()).backward()
            if i in (save_at - 1, save_at + 1):  # skipped steps just before and just after the checkpoint
                model[2].bias.grad[0] = float("inf")
            scaler.step(opt)
            scaler.update()
        ps = list(model.parameters())
        results[backend] = {
            "params": [p.detach().double().flatten().tolist() for p in ps],
            "moments": [opt.state[p][k].double().flatten().tolist() for p in ps
                        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in opt.state[p]],
            "steps": [int(opt.state[p]["step"]) for p in ps],
            "k": int(opt.schedule_index), "scale": scaler.get_scale(), "norm": float(opt.grad_norm)}
    with open(f"{workdir}/{mode}.json", "w") as f:
        f.write(json.dumps(results))
    """
)


def test_checkpoint_resumed_in_a_new_process_continues_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saved mid-schedule, right after a skipped step, with GradScaler state; resumed in a fresh process
    (so nothing survives in memory) it ends bit for bit where the uninterrupted run (this process) ends."""
    args = [str(tmp_path), "14", "6", *CPU_BACKENDS]
    monkeypatch.setattr(sys, "argv", ["train", "straight", *args])
    exec(TRAIN, {"__name__": "train"})
    subprocess.run([sys.executable, "-c", TRAIN, "resume", *args], check=True, cwd=ROOT, timeout=300)
    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "resume.json").read_text())
    assert straight.keys() == resumed.keys() == set(CPU_BACKENDS)
    for backend, run in straight.items():
        assert run == resumed[backend], backend
        assert run["k"] == 14 - 2 and run["steps"] == [12] * 4  # the two skipped steps did not count


# ------------------------------------------------------------------ a step that raises changes nothing
# Every backend runnable here (the Triton kernels under the interpreter), with the interpreter fixture.
from test_step_lifecycle import BACKENDS, _triton_interpreter  # noqa: E402, F401


def _setup(backend: str, low_precision: bool = False) -> tuple[list[torch.nn.Parameter], fusedlr.AdamW]:
    """Two param groups (two buckets), clipping and a schedule; ``low_precision``: the second group holds a
    bf16 param with stochastic rounding and bf16 moments (the reference's mode that computes ahead)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((5, 4), (4,), (3, 3), (7,))]
    second: dict = {"params": params[2:], "lr": 3e-2, "amsgrad": True}
    if low_precision:
        params[3] = torch.nn.Parameter(params[3].detach().bfloat16())
        second = {"params": params[3:], "lr": 3e-2, "stochastic_rounding": True, "state_dtype": torch.bfloat16}
    opt = fusedlr.AdamW([{"params": params[:2]}, second], lr=1e-2, schedule=fusedlr.get_schedule("linear", 2, 20),
                        max_grad_norm=0.5, backend=backend, history=4)
    if low_precision:
        params = params[:2] + params[3:]
    return params, opt


def _grads(params: list[torch.Tensor], i: int) -> None:
    g = torch.Generator().manual_seed(50 + i)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _snapshot(params: list[torch.Tensor], opt: fusedlr.AdamW) -> list[torch.Tensor]:
    """Params, every state tensor, schedule index, grad_norm, applied LRs and the history buffer."""
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.clone() for v in opt.state[p].values()]
    history = opt._history
    assert history is not None
    return out + [opt.schedule_index.clone(), opt.grad_norm.clone(), opt._applied_lr.clone(), history.rows.clone(),
                  history.count.clone()]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))  # bitwise, NaNs where NaNs were


def _raise_on_call(fn, n: int, only_allocating: bool = False):
    """``fn``, raising a simulated out-of-memory error on its ``n``-th call (counting, with
    ``only_allocating``, only calls without ``out=``, which allocate their result)."""
    calls = [0]

    def wrapper(*args, **kwargs):
        if not (only_allocating and "out" in kwargs):
            calls[0] += 1
            if calls[0] == n:
                raise torch.OutOfMemoryError("injected")
        return fn(*args, **kwargs)

    return wrapper


# Functions of torch that allocate their result: the simulated OOM is raised from the n-th call to any of them.
ALLOCATING = ("empty", "empty_like", "zeros", "zeros_like", "full", "full_like", "ones", "tensor", "stack", "cat",
              "where", "sqrt", "pow", "remainder", "_foreach_mul", "_foreach_norm")


class _Twins:
    """The optimizer under test, a fusedlr twin that never sees a fault, and torch.optim.AdamW (clipping with
    ``clip_grad_norm_``, the LR set from the twin's schedule each step)."""

    def __init__(self, backend: str, low_precision: bool = False) -> None:
        self.params, self.opt = _setup(backend, low_precision)
        self.twin_params, self.twin = _setup(backend, low_precision)
        self.torch_params = [torch.nn.Parameter(p.detach().clone()) for p in self.params]
        n = len(self.opt.param_groups[0]["params"])
        self.torch_opt = torch.optim.AdamW(
            [{"params": self.torch_params[:n]}, {"params": self.torch_params[n:], "amsgrad": not low_precision}],
            lr=1e-2, foreach=False)
        self.low_precision = low_precision
        self.i = 0

    def step(self, test_too: bool = True) -> None:
        """One step of the twins (and of the optimizer under test when ``test_too``)."""
        for gi, group in enumerate(self.torch_opt.param_groups):
            group["lr"] = float(self.twin.scheduled_lr(gi))
        for ps in (self.twin_params, self.torch_params) + ((self.params,) if test_too else ()):
            _grads(ps, self.i)
        torch.nn.utils.clip_grad_norm_(self.torch_params, 0.5)
        for o in (self.twin, self.torch_opt) + ((self.opt,) if test_too else ()):
            o.step()
        self.i += 1

    def check(self) -> None:
        _assert_same(_snapshot(self.params, self.opt), _snapshot(self.twin_params, self.twin))
        if not self.low_precision:  # stochastic rounding: the twin is the reference
            for p, q in zip(self.params, self.torch_params):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _faulty_step(t: _Twins, inject, monkeypatch: pytest.MonkeyPatch, general_path: bool = False, **kwargs) -> bool:
    """Step ``t.opt`` with ``inject(monkeypatch)`` in force; if it raised, assert that nothing changed and
    return True; if not, the step ran (the fault was never reached): step the twins too and return False.
    ``general_path``: the fault is injected into Python functions of the general path, which the cpu
    backend's eager fast path (the kernels called from C++, after every check that can fail) does not call,
    so that step takes the general path."""
    _grads(t.params, t.i)
    before = _snapshot(t.params, t.opt)
    if general_path:
        monkeypatch.setattr(fast_step, "ENABLED", False)
    inject(monkeypatch)
    try:
        t.opt.step(**kwargs)
    except (torch.OutOfMemoryError, RuntimeError):
        monkeypatch.undo()
        _assert_same(before, _snapshot(t.params, t.opt))
        return True
    monkeypatch.undo()
    t.step(test_too=False)
    return False


def _then_continues(t: _Twins) -> None:
    """After the failed step, the optimizer continues exactly as the twin (and as torch) does."""
    for _ in range(3):
        t.step()
    t.check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "fault", ["grad_stats on the 2nd bucket", "update of the 2nd bucket", "sparse grad", "grad scaler without a scale"]
)
def test_a_step_that_raises_changes_nothing(backend: str, fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    t = _Twins(backend)
    for _ in range(3):
        t.step()
    impl = t.opt._step_cache["impl"]
    kwargs = {"general_path": fault in ("grad_stats on the 2nd bucket", "update of the 2nd bucket")}
    if fault == "grad_stats on the 2nd bucket":
        inject = lambda mp: mp.setattr(impl, "grad_stats", _raise_on_call(impl.grad_stats, 2))  # noqa: E731
    elif fault == "update of the 2nd bucket":
        inject = lambda mp: mp.setattr(impl, "prepare_update", _raise_on_call(impl.prepare_update, 2))  # noqa: E731
    elif fault == "sparse grad":
        inject = lambda mp: setattr(t.params[1], "grad", t.params[1].grad.to_sparse())  # noqa: E731
    else:
        inject = lambda mp: None  # noqa: E731
        kwargs["grad_scaler"] = torch.amp.GradScaler("cpu")  # never scaled a loss: no scale yet
    assert _faulty_step(t, inject, monkeypatch, **kwargs)
    _then_continues(t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_memory_at_any_allocation_changes_nothing(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A simulated OOM raised from the n-th allocating torch call of a step, for every n until a step
    gets through: each leaves everything as it was (so the update's writes allocate nothing)."""
    t = _Twins(backend)
    for _ in range(3):
        t.step()

    def inject(n: int):
        def patch(mp: pytest.MonkeyPatch) -> None:
            counter = _raise_on_call(lambda f, *a, **k: f(*a, **k), n, only_allocating=True)
            for name in ALLOCATING:
                fn = getattr(torch, name)
                mp.setattr(torch, name, lambda *a, _fn=fn, **k: counter(_fn, *a, **k))
        return patch

    n = 1
    while _faulty_step(t, inject(n), monkeypatch, general_path=True):
        n += 1
    assert n > 3, "the step allocated almost nothing: the injection did not reach it"
    _then_continues(t)


def test_reference_mid_way_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference raising mid-way through a bucket: after its first chunk is prepared (chunks of a few
    elements), and after its first foreach op in a bucket whose update it computes ahead (bf16 moments and
    stochastic rounding)."""
    monkeypatch.setattr(fusedlr.reference_chunks, "CHUNK_NUMEL", 8)
    t = _Twins("torch")
    for _ in range(2):
        t.step()
    chunk = fusedlr.reference_chunks.make_chunk
    fault = _raise_on_call(chunk, 2)
    assert _faulty_step(t, lambda mp: mp.setattr(fusedlr.reference_chunks, "make_chunk", fault), monkeypatch)
    monkeypatch.setattr(fusedlr.reference_chunks, "CHUNK_NUMEL", 8)
    _then_continues(t)

    low = _Twins("torch", low_precision=True)
    for _ in range(2):
        low.step()
    lerp = torch._foreach_lerp_
    assert _faulty_step(low, lambda mp: mp.setattr(torch, "_foreach_lerp_", _raise_on_call(lerp, 1)), monkeypatch)
    _then_continues(low)
