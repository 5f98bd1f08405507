"""What ``torch.optim.Optimizer`` wraps around ``step`` (``profile_hook_step``), for ``fusedlr.AdamW.step`` at a
lower host cost.

torch wraps the class's ``step`` on first construction: a profiler range ``Optimizer.step#<class>.step`` opened
by ``torch.autograd.profiler.record_function`` (an op dispatched through ``torch.ops`` on every step, profiler
on or off: about 0.1 ms of host time when the step runs cold, as after a backward, measured by
benchmarks/host_cost.py's case), the global and per-optimizer step pre/post hooks, and
``_optimizer_step_code`` (the Python tracer's entry point). ``hooked_step`` does the same, opening the range
with ``torch._C._profiler._RecordFunctionFast`` (the same RecordFunction, free when nothing observes it), and
marks the function ``hooked`` so that torch leaves it as it is. Under ``torch.compile`` torch's own wrapper
runs (Dynamo knows ``record_function``), as it does for a subclass that overrides ``step`` (torch wraps that
one; this wrapper then only calls through, so that the hooks run once).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import chain
from typing import Any, TypeVar

import torch
from torch.optim.optimizer import Optimizer, _global_optimizer_post_hooks, _global_optimizer_pre_hooks

__all__ = ["hooked_step"]

F = TypeVar("F", bound=Callable[..., Any])


def hooked_step(func: F) -> F:
    """``func`` (an optimizer's ``step``) with torch's step hooks and profiler range, marked ``hooked``."""
    torch_wrapped = Optimizer.profile_hook_step(func)

    @functools.wraps(func)
    def step(*args: Any, **kwargs: Any) -> Any:  # args[0]: the optimizer (hooks receive it in args, as torch's)
        self: Optimizer = args[0]
        if torch.compiler.is_compiling():
            return torch_wrapped(*args, **kwargs)
        if getattr(type(self), "step", None) is not step:  # a subclass's step, which torch wrapped
            return func(*args, **kwargs)
        with torch._C._profiler._RecordFunctionFast(f"Optimizer.step#{type(self).__name__}.step"):
            for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(
                            f"{func} must return None or a tuple of (new_args, new_kwargs), but got {result}."
                        )
            out = func(*args, **kwargs)
            self._optimizer_step_code()
            for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
                post_hook(self, args, kwargs)
            return out

    step.hooked = True  # type: ignore[attr-defined]
    return step  # type: ignore[return-value]
