"""Backend selection. A backend is a module with ``NAME``, ``available(device)``, ``grad_stats``,
``prepare_update`` and ``adamw_update`` (the signatures of ``fusedlr.reference``, which every backend must match):

* ``grad_stats(bucket, grads, inv_scale, out)``: pass 1, adds into ``out`` (float32 ``[2]``) in a fixed order;
* ``adamw_update(bucket, grads, hyper, ctrl, applied_lr=None)``: pass 2; ``hyper.lr`` is a float or a 0-d
  float32/float64 device tensor read on the device; ``applied_lr`` (0-d float64) receives ``lr * sched(k)``
  unless the step is skipped;
* ``prepare_update(bucket, grads, hyper, ctrl, applied_lr=None)``: pass 2 in two phases: the call does every
  check, fallback decision and allocation and modifies nothing; the function it returns (the commit) runs the
  update and must not allocate or raise for any input the call accepted (``adamw_update`` calls both).

A backend may also fold a step's small ops into its two passes (``FOLDED = True``: ``cpu``, ``cuda``, ``triton``):
``folds(bucket, grads)`` says whether its kernels run the bucket; ``grad_stats`` then also takes ``scale``
(GradScaler's, instead of ``inv_scale``) and ``reset`` (write ``out`` instead of adding), ``grad_stats_set(buckets,
grads, out, scale)`` writes the stats of several buckets in as few launches as it can (``cpu``: one op; ``cuda``,
``triton``: one per gradient dtype), and ``prepare_update`` takes a ``fold=fusedlr.control.FoldedUpdate`` (steps
advanced by the update itself, the whole ``applied_lr`` buffer, the last bucket advancing ``k`` and writing
``grad_norm`` and ``found_inf``). A folding backend may also update several buckets in one launch (``SETS = True``:
``cpu``, ``triton``): ``launch_key(bucket, grads)`` says which buckets may share an update launch (a launch set,
whatever their param groups), ``prepare_update_set(buckets, grads, hypers, ctrl, applied_lr, folds)`` prepares the
folded updates of one launch set (one ``FoldedUpdate`` per bucket; only the last has outputs).
``fusedlr.AdamW`` folds a step when every bucket folds and there is no ``history=`` and no distributed
reduction; otherwise it runs these small ops itself around the interface above (the reference never folds).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

__all__ = ["BACKENDS", "resolve", "unavailable", "describe"]

BACKENDS: tuple[str, ...] = ("auto", "torch", "triton", "cuda", "cpu")

_MODULES = {
    "torch": "fusedlr.reference",
    "triton": "fusedlr.triton",
    "cuda": "fusedlr.extension.cuda",
    "cpu": "fusedlr.extension.cpu",
}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_MODULES[name]), None
    except ImportError as err:
        return None, f"it could not be imported ({err})"


def _check(name: str, device: torch.device) -> tuple[ModuleType | None, str | None]:
    module, reason = _load(name)
    if module is not None:
        reason = module.available(device)
    return (module, None) if reason is None else (None, reason)


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` on ``device``; ``auto`` picks the fastest one that works.

    Raises RuntimeError naming the reason (and the fix) when an explicitly requested backend cannot run.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            module, _ = _check(candidate, device)
            if module is not None:
                return module
        raise AssertionError("the torch backend is always available")
    module, reason = _check(name, device)
    if module is None:
        raise RuntimeError(f"fusedlr backend={name!r} cannot run on {device}: {reason}")
    return module


def unavailable(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else why not (and the fix)."""
    return _check(name, device)[1]


def describe(device: torch.device) -> dict[str, str]:
    """For each backend, 'ok' or why it cannot run on ``device`` (for ``python -m fusedlr info``)."""
    return {name: unavailable(name, device) or "ok" for name in BACKENDS[1:]}
