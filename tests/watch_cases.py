"""Edits of ``param_groups`` and ``optimizer.state`` and whether each leaves a plan valid: the cases
``fusedlr._C.watch_unchanged`` (csrc/plan_watch.cpp) is checked on against its Python spec, ``fusedlr.watch``.

Torch-free (plain objects stand for parameters and tensors), so that ``tests/test_plan_watch.py`` also runs them on
CPython versions torch is not installed for, with csrc/plan_watch.cpp compiled alone (``run``)."""

from __future__ import annotations

from typing import Any, Callable

OPTIONS = {"amsgrad": False, "state_dtype": None, "master_weights": "remainder", "stochastic_rounding": False}


class Obj:
    """A parameter or a tensor: compared by identity only."""


def make() -> tuple[list[dict], dict, list[Obj]]:
    """Two groups of 300 params (lengths above 256 are new ints each time), their states, a non-param entry."""
    params = [Obj() for _ in range(600)]
    groups = [{"params": params[:300], "lr": 0.1, **OPTIONS}, {"params": params[300:], "lr": 0.2, **OPTIONS}]
    state: dict[Any, Any] = {p: {"step": Obj(), "exp_avg": Obj(), "exp_avg_sq": Obj()} for p in params}
    state["not a param"] = 7
    return groups, state, params


EDITS: dict[str, Callable[[list[dict], dict, list[Obj]], Any]] = {
    "nothing": lambda pg, st, ps: None,
    "state entry": lambda pg, st, ps: st[ps[0]].__setitem__("exp_avg", Obj()),
    "state entry, same object": lambda pg, st, ps: st[ps[3]].__setitem__("exp_avg", st[ps[3]]["exp_avg"]),
    "state entry deleted": lambda pg, st, ps: st[ps[1]].pop("exp_avg_sq"),
    "state entry added": lambda pg, st, ps: st[ps[599]].__setitem__("extra", 1),
    "param state": lambda pg, st, ps: st.__setitem__(ps[2], dict(st[ps[2]])),
    "state entry of a non-param": lambda pg, st, ps: st.__setitem__("not a param", 8),
    "state cleared": lambda pg, st, ps: st.clear(),
    "params appended": lambda pg, st, ps: pg[0]["params"].append(Obj()),
    "params slot": lambda pg, st, ps: pg[1]["params"].__setitem__(0, Obj()),
    "params list": lambda pg, st, ps: pg[1].__setitem__("params", list(pg[1]["params"])),
    "group": lambda pg, st, ps: pg.__setitem__(0, dict(pg[0])),
    "group added": lambda pg, st, ps: pg.append({"params": [], "amsgrad": False}),
    "amsgrad": lambda pg, st, ps: pg[0].__setitem__("amsgrad", True),
    "master_weights, an equal str": lambda pg, st, ps: pg[0].__setitem__("master_weights", "".join(["rem", "ainder"])),
    "an unwatched option (lr)": lambda pg, st, ps: pg[0].__setitem__("lr", 0.5),
}
UNCHANGED = {"nothing", "state entry, same object", "master_weights, an equal str", "an unwatched option (lr)"}


def memo_kind(version: tuple[int, int]) -> str:
    """What csrc/plan_watch.cpp keeps after a walk on CPython ``version``: "versions" (a dict version tag per
    group and state dict, 16 bytes each) before 3.12, "count" (the dict watcher's count, 8 bytes) from 3.12 on."""
    return "versions" if version < (3, 12) else "count"


def run(native: Callable[..., bool], watch: Any, version: tuple[int, int]) -> list[str]:
    """Every edit, on a fresh memo and after a step kept one: what ``native`` says against ``watch``'s spec and
    against the expected answer, and the memo a walk leaves on CPython ``version``. Returns the disagreements
    (empty: all agree)."""
    failures = []
    pg, st, _ = make()
    memo = bytearray()
    native(pg, st, watch.snapshot(pg, st), watch.PLAN_OPTIONS, memo)
    dicts = len(pg) + 1 + sum(isinstance(v, dict) for v in st.values())
    if len(memo) != {"versions": 16 * dicts, "count": 8}[memo_kind(version)]:
        failures.append(f"a walk left a memo of {len(memo)} bytes ({dicts} dicts, {memo_kind(version)})")
    for name, edit in EDITS.items():
        for kept in (False, True):
            pg, st, ps = make()
            watched, memo = watch.snapshot(pg, st), bytearray()
            if kept and not native(pg, st, watched, watch.PLAN_OPTIONS, memo):
                failures.append(f"{name}: unchanged before the edit, native says changed")
            edit(pg, st, ps)
            now = watch.snapshot(pg, st)
            spec = len(now) == len(watched) and all(watch._same(a, b) for a, b in zip(now, watched))
            expected = name in UNCHANGED
            for attempt in ("first", "again"):
                got = native(pg, st, watched, watch.PLAN_OPTIONS, memo)
                if not (got is spec is expected):
                    failures.append(f"{name} (memo {'kept' if kept else 'fresh'}, {attempt}): native {got}, spec {spec}")
    return failures
