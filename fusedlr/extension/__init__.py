"""Loader of the compiled kernels ``fusedlr._C`` (built by ``setup.py``; optional).

Importing this package never fails: ``load_error()`` says why the extension is unusable (with
the fix), ``require()`` raises that as a RuntimeError. When ``fusedlr._C`` loads, its ops are
``torch.ops.fusedlr.{grad_stats, adamw_update, schedule_eval}``, with fake implementations
registered here so that torch.compile can trace them.
"""

from __future__ import annotations

import torch

__all__ = ["INSTALL_HINT", "_C", "has_kernel", "load_error", "require", "schedule_eval", "with_cuda"]

INSTALL_HINT = (
    "build it from the fusedlr checkout with `pip install --no-build-isolation -e .` "
    "(needs a C++ compiler and the installed torch; CUDA kernels also need nvcc and a CUDA build of torch, "
    "FUSEDLR_BUILD_EXT=1 makes build failures visible)"
)

_C = None
_ERROR: str | None = None
try:
    from .. import _C  # type: ignore[attr-defined, no-redef]
except ImportError as err:  # not built, or built against another torch
    _ERROR = f"the compiled extension fusedlr._C is not available ({err}); {INSTALL_HINT}"
except OSError as err:
    _ERROR = f"the compiled extension fusedlr._C failed to load ({err}); rebuild it: {INSTALL_HINT}"

_OPS = ("grad_stats", "adamw_update", "schedule_eval")
if _C is not None:
    try:
        for _name in _OPS:
            getattr(torch.ops.fusedlr, _name)
    except (AttributeError, RuntimeError) as err:
        _ERROR = f"fusedlr._C loaded but does not define torch.ops.fusedlr.{_name} ({err}); rebuild it: {INSTALL_HINT}"
        _C = None


def load_error() -> str | None:
    """None when the extension is loaded, else why not and how to build it."""
    return _ERROR


def require() -> None:
    """Raise RuntimeError (with the build command) unless the extension is loaded."""
    if _ERROR is not None:
        raise RuntimeError(_ERROR)


def with_cuda() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", 0))


def has_kernel(device_type: str) -> bool:
    """Whether every fusedlr op has a kernel for ``device_type`` ("cpu" or "cuda")."""
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedlr::{op}", key) for op in _OPS)


def schedule_eval(table: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """``sched(k)`` for every k of the int64 tensor ``ks``, as the compiled kernels evaluate it."""
    require()
    return torch.ops.fusedlr.schedule_eval(table, ks)


if _C is not None:

    @torch.library.register_fake("fusedlr::grad_stats")
    def _grad_stats_fake(
        grads, inv_scale, out, table=None, table_host=None, workspace=None, scale=None, reset=False
    ) -> None:
        return None

    @torch.library.register_fake("fusedlr::adamw_update")
    def _adamw_update_fake(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        k,
        schedule,
        stats,
        max_norm,
        inv_scale,
        found_inf,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        maximize,
        masters,
        remainders,
        table=None,
        table_host=None,
        lr_tensor=None,
        applied_lr=None,
        pids=None,
        seed=0,
        stochastic=False,
        lr_index=0,
        scale=None,
        skip_nonfinite=False,
        advance=False,
        advance_k=False,
        norm_out=None,
        found_inf_out=None,
        workspace=None,
    ) -> None:
        return None

    @torch.library.register_fake("fusedlr::grad_stats_set")
    def _grad_stats_set_fake(grads, sizes, out, scale=None, reset=False) -> None:
        return None

    @torch.library.register_fake("fusedlr::adamw_update_set")
    def _adamw_update_set_fake(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        masters,
        remainders,
        steps,
        k,
        applied_lr,
        sizes,
        groups,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        maximize,
        lr_tensors,
        pids,
        schedule,
        stats,
        max_norm,
        found_inf,
        scale=None,
        skip_nonfinite=False,
        advance_k=False,
        norm_out=None,
        found_inf_out=None,
        seed=0,
        stochastic=False,
    ) -> None:
        return None

    @torch.library.register_fake("fusedlr::adamw_update_set.cached")
    def _adamw_update_set_cached_fake(*args, table=None, table_host=None, workspace=None, **kwargs) -> None:
        return _adamw_update_set_fake(*args, **kwargs)

    @torch.library.register_fake("fusedlr::schedule_eval")
    def _schedule_eval_fake(table, ks):
        return torch.empty_like(ks, dtype=torch.float64, memory_format=torch.contiguous_format)
