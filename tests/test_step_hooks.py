"""``fusedlr.AdamW.step``'s hooks and profiler range (``fusedlr.step_hooks``) behave as torch.optim's wrapper
does for ``torch.optim.AdamW``: the same hook calls in the same order, once, a subclass's overriding ``step``
included, pre-hooks that replace the arguments (or return something else), and the ``Optimizer.step#<class>.step`` profiler range."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import fusedlr


class _FusedSub(fusedlr.AdamW):
    def step(self, closure: Any = None, grad_scaler: Any = None) -> Any:  # type: ignore[override]
        return super().step(closure, grad_scaler)


def _hook_calls(cls: type, steps: int = 2) -> tuple[list[str], torch.Tensor]:
    param = torch.nn.Parameter(torch.linspace(-1, 1, 3))
    opt = cls([param], lr=0.1)
    calls: list[str] = []

    def pre(o: Any, args: tuple, kwargs: dict) -> Any:
        calls.append(f"pre {len(args)} {sorted(kwargs)}")
        return args, {"closure": lambda: calls.append("closure")}  # args: (optimizer,); replaces the keywords

    handles = [
        opt.register_step_pre_hook(pre),
        opt.register_step_post_hook(lambda o, a, k: calls.append(f"post {sorted(k)}")),
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
    ]
    try:
        for _ in range(steps):
            param.grad = torch.ones(3)
            opt.step()
    finally:
        for h in handles:
            h.remove()
    return calls, param.detach()


def test_hooks_fire_as_for_torch_adamw() -> None:
    ref, ref_param = _hook_calls(torch.optim.AdamW)
    ours, param = _hook_calls(fusedlr.AdamW)
    assert ours == ref
    assert ours.count("global pre") == 2 and "closure" in ours
    torch.testing.assert_close(param, ref_param)


def test_hooks_fire_once_for_a_subclass_that_overrides_step() -> None:
    """torch wraps the subclass's step; fusedlr.AdamW.step, which it calls, then only calls through (torch's own
    AdamW fires the hooks twice here once a plain torch.optim.AdamW has been built, its step wrapped too)."""
    calls, _ = _hook_calls(_FusedSub)
    per_step = ["global pre", "pre 1 []", "closure", "post ['closure']", "global post"]
    assert calls == per_step * 2


def test_a_pre_hook_returning_something_else_is_refused() -> None:
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    opt = fusedlr.AdamW([param])
    opt.register_step_pre_hook(lambda o, a, k: "not a tuple")
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        opt.step()
    assert torch.equal(param.detach(), torch.ones(2))


@pytest.mark.parametrize("cls", [fusedlr.AdamW, _FusedSub])
def test_the_step_is_a_profiler_range(cls: type) -> None:
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    opt = cls([param], backend="cpu" if fusedlr.extension.load_error() is None else "torch")
    opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        param.grad = torch.ones(2)
        opt.step()
    names = [e.name for e in prof.events()]
    assert names.count(f"Optimizer.step#{cls.__name__}.step") == 1, names
