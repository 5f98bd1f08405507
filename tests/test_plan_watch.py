"""Replacing what the optimizer reads between steps (a state tensor, a parameter's state, a group's ``params``,
a plan option) takes effect at the next step, as with torch.optim.AdamW, which reads them every step; and
``fusedlr._C.watch_unchanged`` agrees with its Python spec ``fusedlr.watch`` (tests/watch_cases.py), here and,
compiled alone, on the other CPython versions found (3.12+ take its dict-watcher path)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

import fusedlr
from fusedlr import backends, extension, fast_step, watch

sys.path.insert(0, str(Path(__file__).parent))
import watch_cases  # noqa: E402

CPU_BACKENDS = [name for name in ("torch", "cpu") if backends.unavailable(name, torch.device("cpu")) is None]
# "cpu" steps through the C++ fast path; "cpu-op-path" the same backend with the fast path off.
PATHS = CPU_BACKENDS + (["cpu-op-path"] if "cpu" in CPU_BACKENDS else [])
NATIVE = getattr(extension._C, "watch_unchanged", None) if extension.load_error() is None else None


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(4, 3), (3,), (2, 2, 2), (5,)]]


def set_grads(params: list[torch.Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


def groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "lr": 3e-2, "betas": (0.8, 0.99)}]


def moved(state: dict) -> dict:
    """A parameter's state as a device round trip leaves it: every tensor a new one, values equal."""
    return {k: v.to(torch.float64).to(v.dtype) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def replace_exp_avg(opt, params) -> None:
    opt.state[params[0]]["exp_avg"] = torch.full_like(params[0], 0.25)


def replace_exp_avg_sq(opt, params) -> None:
    opt.state[params[2]]["exp_avg_sq"] = opt.state[params[2]]["exp_avg_sq"] * 4.0


def replace_step(opt, params) -> None:
    step = opt.state[params[1]]["step"]
    opt.state[params[1]]["step"] = torch.tensor(40, dtype=step.dtype)  # bias correction of step 41 next


def replace_param_state(opt, params) -> None:  # e.g. Lightning's optimizer_to_device, states offloaded and back
    for p in list(opt.state):
        opt.state[p] = moved(opt.state[p])


def append_param(opt, params) -> None:
    extra = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 6))
    params.append(extra)
    opt.param_groups[0]["params"].append(extra)


def drop_param(opt, params) -> None:
    opt.param_groups[1]["params"] = opt.param_groups[1]["params"][:1]


def swap_param(opt, params) -> None:  # same list, same length, another parameter in a slot
    extra = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 3))
    params.append(extra)
    opt.param_groups[0]["params"][1] = extra


def replace_group(opt, params) -> None:
    opt.param_groups[1] = {**opt.param_groups[1], "params": list(reversed(opt.param_groups[1]["params"]))}


def turn_amsgrad_on(opt, params) -> None:
    opt.param_groups[1]["amsgrad"] = True
    for p in opt.param_groups[1]["params"]:  # torch.optim.AdamW does not create it mid-training; fusedlr does
        if isinstance(opt, torch.optim.AdamW) and not isinstance(opt, fusedlr.AdamW):
            opt.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)


def clear_state(opt, params) -> None:
    opt.state.clear()


MUTATIONS: dict[str, Callable] = {
    f.__name__: f
    for f in (
        replace_exp_avg,
        replace_exp_avg_sq,
        replace_step,
        replace_param_state,
        append_param,
        drop_param,
        swap_param,
        replace_group,
        turn_amsgrad_on,
        clear_state,
    )
}


def run(path: str | None, mutate: Callable, monkeypatch) -> tuple[list[torch.Tensor], object]:
    params = make_params()
    if path is None:
        opt = torch.optim.AdamW(groups(params), lr=1e-2)
    else:
        monkeypatch.setattr(fast_step, "ENABLED", path != "cpu-op-path")
        opt = fusedlr.AdamW(groups(params), lr=1e-2, backend=path.removesuffix("-op-path"))
    for step in range(3):
        set_grads(params, step)
        opt.step()
    mutate(opt, params)
    for step in range(3, 6):
        set_grads(params, step)
        opt.step()
    return params, opt


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("path", PATHS)
def test_a_replacement_between_steps_takes_effect_as_in_torch(path: str, mutation: str, monkeypatch) -> None:
    ref_params, ref = run(None, MUTATIONS[mutation], monkeypatch)
    params, opt = run(path, MUTATIONS[mutation], monkeypatch)
    assert len(params) == len(ref_params)
    for i, (p, q) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7, msg=lambda m: f"param {i}: {m}")
        if q in ref.state:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(
                    opt.state[p][key].to(ref.state[q][key].dtype), ref.state[q][key], rtol=1e-5, atol=1e-7
                )
        else:
            assert p not in opt.state


def test_the_fast_path_still_runs_when_nothing_changed(monkeypatch) -> None:
    """The watch does not send a steady loop to the general path (each step after the first is fast)."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("the cpu backend (fusedlr._C) is not built")
    monkeypatch.setattr(fast_step, "ENABLED", True)  # also under FUSEDLR_FAST_PATH=0
    params = make_params()
    opt = fusedlr.AdamW(groups(params), lr=1e-2, backend="cpu")
    set_grads(params, 0)
    opt.step()
    ran = []
    real = fast_step.step
    monkeypatch.setattr(fast_step, "step", lambda o, s: ran.append(real(o, s)) or ran[-1])
    for step in range(1, 4):
        set_grads(params, step)
        opt.step()
    assert ran == [True, True, True]
    replace_exp_avg(opt, params)
    set_grads(params, 4)
    opt.step()
    assert ran[-1] is False  # the general path rebuilt the plan
    set_grads(params, 5)
    opt.step()
    assert ran[-1] is True


def watched_pair() -> tuple[list[dict], dict, list[torch.nn.Parameter]]:
    params = make_params()
    opt = fusedlr.AdamW(groups(params), lr=1e-2, backend="torch")
    set_grads(params, 0)
    opt.step()
    return opt.param_groups, opt.state, params


def test_a_state_entry_replaced_then_restored_is_unchanged() -> None:
    """A dict whose version changed is walked again, and found as recorded."""
    pg, st, ps = watched_pair()
    watched, memo = watch.snapshot(pg, st), bytearray()
    assert watch.unchanged(pg, st, watched, memo)
    kept = st[ps[0]]["exp_avg"]
    st[ps[0]]["exp_avg"] = torch.zeros(4, 3)
    assert not watch.unchanged(pg, st, watched, memo)
    st[ps[0]]["exp_avg"] = kept
    assert watch.unchanged(pg, st, watched, memo)
    assert watch.unchanged(pg, st, watched, memo)


def test_containers_a_plan_cannot_watch_are_refused_with_their_fix() -> None:
    params = make_params()
    with pytest.raises(TypeError, match="optimizer.state must be a dict"):
        watch.snapshot([{"params": params}], [1, 2])
    with pytest.raises(TypeError, match=r"param_groups\[0\] must be a dict whose 'params' is a list"):
        watch.snapshot([{"params": set(params)}], {})


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_step_tensor_in_two_states_becomes_two_counters(backend: str) -> None:
    """A step tensor put in two parameters' states by hand is not pointed at both of their counters (the
    second would take the first's count): each state gets its own counter, starting from the shared value."""
    params = make_params()[:2]
    opt = fusedlr.AdamW(params, lr=1e-2, backend=backend)
    for step in range(2):
        set_grads(params, step)
        opt.step()
    shared = torch.tensor(4, dtype=torch.int64)
    opt.state[params[0]]["step"] = opt.state[params[1]]["step"] = shared
    set_grads(params, 2)
    params[0].grad = None
    opt.step()  # only params[1] is updated
    steps = [opt.state[p]["step"] for p in params]
    assert steps[0] is not steps[1]
    assert [int(s) for s in steps] == [4, 5]


# ------------------------------------------------------------------ the C++ pass on other CPython versions
ROOT = Path(__file__).resolve().parents[1]
MODULE_INIT = """
#include <Python.h>
#include "plan_watch.h"
static PyMethodDef methods[] = {{"watch_unchanged", fusedlr::watch_unchanged, METH_VARARGS, nullptr},
                                {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "plan_watch_alone", nullptr, -1, methods};
PyMODINIT_FUNC PyInit_plan_watch_alone(void) { return PyModule_Create(&module); }
"""
RUN_CASES = """
import importlib.util, sys
sys.path[:0] = sys.argv[1:3]
import plan_watch_alone, watch_cases
spec = importlib.util.spec_from_file_location("watch", sys.argv[3])
watch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(watch)
failures = watch_cases.run(plan_watch_alone.watch_unchanged, watch, sys.version_info[:2])
print("\\n".join(failures) or "ok")
sys.exit(1 if failures else 0)
"""


def other_cpythons() -> list[str]:
    """CPython interpreters other than this one, 3.10 or later, found on PATH or in pyenv's versions."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = glob.glob(os.path.join(root, "versions", "3.*", "bin", "python3"))
    found += [p for p in (shutil.which(f"python3.{m}") for m in range(10, 16)) if p]
    versions: dict[tuple[int, int], str] = {}
    for path in found:
        out = subprocess.run([path, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True)
        if out.returncode == 0:
            version = tuple(int(v) for v in out.stdout.split())
            if (3, 10) <= version != sys.version_info[:2]:
                versions.setdefault(version, path)
    return [versions[v] for v in sorted(versions)]


def test_native_watch_agrees_with_the_spec_on_the_shared_cases() -> None:
    """tests/watch_cases.py on fusedlr._C (this CPython)."""
    if NATIVE is None:
        pytest.skip("fusedlr._C is not built")
    assert watch_cases.run(NATIVE, watch, sys.version_info[:2]) == []


@pytest.mark.parametrize("python", other_cpythons())
def test_native_watch_on_another_cpython(python: str, tmp_path: Path) -> None:
    """csrc/plan_watch.cpp compiled alone for another CPython (3.12+ takes the dict-watcher path, which this
    interpreter's build of fusedlr._C does not): tests/watch_cases.py against fusedlr/watch.py's spec there."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    paths = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['include']); print(sysconfig.get_config_var('EXT_SUFFIX'))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    (tmp_path / "init.cpp").write_text(MODULE_INIT)
    subprocess.run(
        [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{paths[0]}", f"-I{ROOT / 'csrc'}",
         str(ROOT / "csrc" / "plan_watch.cpp"), str(tmp_path / "init.cpp"), "-o", str(tmp_path / f"plan_watch_alone{paths[1]}")],
        check=True,
    )
    out = subprocess.run(
        [python, "-c", RUN_CASES, str(tmp_path), str(Path(__file__).parent), str(ROOT / "fusedlr" / "watch.py")],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
