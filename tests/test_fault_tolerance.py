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
def _setup(backend: str) -> tuple[list[torch.nn.Parameter], fusedlr.AdamW]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((5, 4), (4,), (3, 3))]
    opt = fusedlr.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 3e-2, "amsgrad": True}],
                        lr=1e-2, schedule=fusedlr.get_schedule("linear", 2, 20), max_grad_norm=0.5, backend=backend)
    return params, opt


def _grads(params: list[torch.Tensor], i: int) -> None:
    g = torch.Generator().manual_seed(50 + i)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _snapshot(params: list[torch.Tensor], opt: fusedlr.AdamW) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.clone() for v in opt.state[p].values()]
    return out + [opt.schedule_index.clone(), opt.grad_norm.clone()]


def _raise_on_call(fn, n: int):
    """``fn``, raising a simulated out-of-memory error on its ``n``-th call."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise torch.OutOfMemoryError("injected")
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "fault", ["grad_stats on the 2nd bucket", "adamw_update", "sparse grad", "grad scaler without a scale"]
)
def test_a_step_that_raises_changes_nothing(backend: str, fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    params, opt = _setup(backend)
    twin_params, twin = _setup(backend)
    for i in range(3):
        for ps, o in ((params, opt), (twin_params, twin)):
            _grads(ps, i)
            o.step()
    _grads(params, 3)
    before = _snapshot(params, opt)
    impl = opt._step_cache["impl"]
    kwargs = {}
    if fault in ("grad_stats on the 2nd bucket", "adamw_update"):
        # Injected into the backend's Python functions: the op path (the cpu backend's eager fast path
        # calls the kernels from C++, after every check that can fail).
        monkeypatch.setattr(fast_step, "step", lambda opt, grad_scaler: False)
    if fault == "grad_stats on the 2nd bucket":
        monkeypatch.setattr(impl, "grad_stats", _raise_on_call(impl.grad_stats, 2))
    elif fault == "adamw_update":
        monkeypatch.setattr(impl, "adamw_update", _raise_on_call(impl.adamw_update, 1))
    elif fault == "sparse grad":
        params[1].grad = params[1].grad.to_sparse()
    else:
        kwargs["grad_scaler"] = torch.amp.GradScaler("cpu")  # never scaled a loss: no scale yet
    with pytest.raises((torch.OutOfMemoryError, RuntimeError)):
        opt.step(**kwargs)
    after = _snapshot(params, opt)
    for b, a in zip(before, after):
        assert torch.equal(b, a) or bool(b.isnan().all() and a.isnan().all())
    monkeypatch.undo()
    # The retried step continues exactly as if the failed one had never been tried.
    _grads(params, 3)
    for i in range(3, 6):
        _grads(params, i)
        _grads(twin_params, i)
        opt.step()
        twin.step()
    for a, b in zip(_snapshot(params, opt), _snapshot(twin_params, twin)):
        assert torch.equal(a, b)
