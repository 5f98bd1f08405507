"""What a cached plan was built from in ``param_groups`` and ``optimizer.state``, checked by identity each step.

A plan (``fusedlr.plan``) holds the parameters and states it updates. It is valid only while
``param_groups`` and ``optimizer.state`` still name them, as torch.optim.AdamW, which reads both every step,
sees them: the same group list, group dicts, ``params`` lists and parameters in them, the same values of the
group options a plan is built from (``PLAN_OPTIONS``), the same state mapping and, in it, the same entries
(key and value objects) of every parameter's state. So ``opt.state[p]["exp_avg"] = t``, ``opt.state[p] = {...}``
(moving states to another device), ``group["params"].append(q)`` or ``group["amsgrad"] = True`` rebuild the plan
at the next step. Changes inside a tensor (``t.copy_(...)``, ``t.data = ...``) keep it: the kernels read each
tensor's storage every step, and the plan's signature (``fusedlr.plan.scan``) follows the parameters'.

``snapshot`` records all of it as one flat tuple; ``unchanged`` compares, in one C++ pass
(``fusedlr._C.watch_unchanged``, csrc/plan_watch.cpp) when the extension is built, else in Python (``_same``,
the spec). After a walk found everything as recorded, the C++ pass keeps in the plan's ``memo`` what tells that
a dict has not changed since, and reads no entry of such a dict: the dicts' version tags before CPython 3.12 (one
load per parameter), a dict watcher's count of changes from 3.12 on (one compare for the whole state).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PLAN_OPTIONS", "snapshot", "unchanged"]

#: The param-group options a plan is built from (the others are read every step).
PLAN_OPTIONS = ("amsgrad", "state_dtype", "master_weights", "stochastic_rounding")


def snapshot(param_groups: list[dict[str, Any]], state: dict[Any, Any]) -> tuple:
    """``param_groups`` and ``state`` as one flat tuple: each container, then its length and its items.

    Layout: ``param_groups``, its length; per group: the group, its ``params``, their number, the params,
    the ``PLAN_OPTIONS`` values (None when missing); then ``state``, its length; per entry: key, value and
    the value's length and items (key, value, ...) when the value is a dict, else -1. The tuple holds
    every object it names, so none is freed and its address reused while the plan lives.
    """
    if not isinstance(state, dict):
        raise TypeError(f"optimizer.state must be a dict (torch's is a defaultdict), got {type(state).__name__}")
    items: list[Any] = [param_groups, len(param_groups)]
    for gi, group in enumerate(param_groups):
        params = group["params"] if isinstance(group, dict) else None
        if not isinstance(params, (list, tuple)):
            raise TypeError(
                f"param_groups[{gi}] must be a dict whose 'params' is a list (as add_param_group makes it), got "
                f"{type(group).__name__}" + ("" if params is None else f" with 'params' a {type(params).__name__}")
            )
        items += [group, params, len(params), *params, *[group.get(key) for key in PLAN_OPTIONS]]
    items += [state, len(state)]
    for key, value in state.items():
        items += [key, value]
        if isinstance(value, dict):
            items.append(len(value))
            for entry in value.items():
                items += entry
        else:
            items.append(-1)
    return tuple(items)


def _same(now: Any, then: Any) -> bool:
    """Whether an item of a snapshot still holds: the same object, or an equal int (a length) or str (an
    option value). Nothing else is compared by value (a tensor's ``==`` would be an op)."""
    return now is then or (type(now) is type(then) and type(now) in (int, str) and now == then)


def unchanged(param_groups: list[dict[str, Any]], state: dict[Any, Any], watched: tuple, memo: bytearray) -> bool:
    """Whether ``snapshot(param_groups, state)`` would still equal ``watched`` item for item (``_same``).
    ``memo``: the C++ pass's record of dict versions, kept with ``watched`` (empty at first)."""
    import torch

    from . import extension

    native = getattr(extension._C, "watch_unchanged", None) if extension.load_error() is None else None
    if native is not None and not torch.compiler.is_compiling():
        return native(param_groups, state, watched, PLAN_OPTIONS, memo)
    try:
        now = snapshot(param_groups, state)
    except TypeError:  # not a plan's containers any more: the rebuild raises the message
        return False
    return len(now) == len(watched) and all(_same(a, b) for a, b in zip(now, watched))
