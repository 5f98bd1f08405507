"""Low-precision training modes of ``fusedlr.AdamW``: fp32 master weights (whole, or only the 16 low
bits), stochastic rounding to bfloat16 and bfloat16 moments. This module is the exact per-element
spec every backend implements; the reference backend calls these functions.

Bit patterns are unsigned 32-bit integers held in int64 tensors, and every product stays below
2^63, so torch (int64), C++ (``uint32_t``) and Triton (``uint32``) compute the same values.

Counter-based RNG (no state; a step replays identically, eager or in a CUDA graph)::

    hash32(x) = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16   (mod 2^32)
    key       = hash32(hash32(hash32(hash32(seed) ^ pid) ^ t_lo) ^ t_hi)       one per tensor and step
    ka, kb    = hash32(key ^ stream), hash32(ka ^ 0x9E3779B9)                 one pair per stored tensor
    r         = hash32((hash32(i_lo ^ ka) ^ kb) + i_hi)                        one per element

``seed`` is the optimizer's ``seed`` (0 <= seed < 2^32); ``pid`` the parameter's index among all
parameters of the optimizer (param group order); ``t`` its step number of this update (1 for its
first, ``state['step']`` after the update), ``t_lo``/``t_hi`` its low/high 32 bits; ``stream`` is 0
for the parameter, 1 ``exp_avg``, 2 ``exp_avg_sq``, 3 ``max_exp_avg_sq``; ``i`` is the element's
offset in memory from the tensor's first element (its row-major index for a contiguous tensor).

Stochastic rounding of a float32 ``x`` to bfloat16 with bits ``u``: ``(u + (r >> 16)) & 0xFFFF0000``,
which rounds the magnitude up with probability (low 16 bits of u) / 2^16, so ``E[round(x)] = x``
exactly (NaN is rounded to nearest instead; a value within one bf16 ulp of the largest bf16 may
round to inf, as its nearest neighbour above is inf).

Remainder master weights (``master_weights="remainder"``): the fp32 master with bits ``u`` is stored
as the bfloat16 parameter ``hi + (lo >= 0x8000)`` and the int16 ``remainder = lo`` (reinterpreted),
where ``hi = u >> 16`` and ``lo = u & 0xFFFF``. The parameter is the master rounded to nearest (ties
away from zero: the one case, ``lo == 0x8000``, where round-to-nearest-even would pick the other
neighbour; 16 bits cannot also record which way a tie went), and the master is recovered exactly as
``u = ((param - (remainder < 0)) << 16) | (remainder & 0xFFFF)``. A NaN master is stored as a quiet
NaN parameter with remainder 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .distributed import local

__all__ = [
    "GROUP_DEFAULTS",
    "MASTER_MODES",
    "STATE_DTYPES",
    "STATE_KEYS",
    "Streams",
    "BucketPrecision",
    "check_options",
    "check_bucket",
    "init_master",
    "hash32",
    "tensor_keys",
    "random_bits",
    "element_index",
    "stochastic_round_bf16",
    "split_master",
    "join_master",
]

#: Values of ``master_weights``.
MASTER_MODES: tuple[object, ...] = (False, True, "remainder")
#: Values of ``state_dtype`` (None: float32, float64 for float64 parameters).
STATE_DTYPES: tuple[object, ...] = (None, torch.float32, torch.bfloat16)
#: State keys of the master weights, beside torch AdamW's.
STATE_KEYS = ("master_param", "master_remainder")
#: The param group options of these modes (``fusedlr.AdamW`` keyword arguments) and their defaults.
GROUP_DEFAULTS: dict[str, object] = {"master_weights": False, "stochastic_rounding": False, "state_dtype": None}

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


class Streams:
    """The ``stream`` of each stored tensor in the RNG key."""

    PARAM = 0
    EXP_AVG = 1
    EXP_AVG_SQ = 2
    MAX_EXP_AVG_SQ = 3


@dataclass
class BucketPrecision:
    """What a bucket stores besides torch AdamW's state (None on a bucket for the default mode).

    master: fp32 master of each parameter (``master_weights=True``), or None.
    remainder: int16 low bits of each master (``master_weights="remainder"``), or None.
    stochastic: stochastic rounding of the bf16 values the update stores (params without master, moments).
    seed: the RNG seed; pids: int64 tensor ``[n]`` on the device, the ``pid`` of each parameter.
    """

    master: list[Tensor] | None
    remainder: list[Tensor] | None
    stochastic: bool
    seed: int
    pids: Tensor


def check_options(master_weights: object, stochastic_rounding: object, state_dtype: object, where: str) -> None:
    """Raise ValueError (naming the option and the fix) for a value that no parameter could use."""
    if not any(master_weights is m or (isinstance(m, str) and master_weights == m) for m in MASTER_MODES):
        raise ValueError(f"{where}master_weights must be False, True or 'remainder', got {master_weights!r}")
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(f"{where}stochastic_rounding must be True or False, got {stochastic_rounding!r}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(
            f"{where}state_dtype must be None (float32), torch.float32 or torch.bfloat16, got {state_dtype!r}"
        )
    if stochastic_rounding and master_weights is not False and state_dtype is not torch.bfloat16:
        raise ValueError(
            f"{where}stochastic_rounding=True with master_weights has nothing to round (the master is fp32 and "
            "the param is rounded to nearest from it): drop one, or set state_dtype=torch.bfloat16 to round moments"
        )


def check_bucket(group: dict[str, Any], group_index: int, dtype: torch.dtype) -> None:
    """Raise ValueError when param group ``group_index``'s modes cannot apply to its ``dtype`` params."""
    where = f"param group {group_index} has {dtype} parameters"
    master, sr, sdt = group["master_weights"], group["stochastic_rounding"], group["state_dtype"]
    low = dtype in (torch.bfloat16, torch.float16)
    if master is not False and not low:
        raise ValueError(
            f"fusedlr.AdamW: master_weights={master!r} keeps an fp32 copy of bfloat16/float16 parameters, but {where}: "
            "put them in a param group with master_weights=False"
        )
    if master == "remainder" and dtype != torch.bfloat16:
        raise ValueError(
            f"fusedlr.AdamW: master_weights='remainder' stores the 16 bits bfloat16 drops from fp32, but {where} "
            "(float16 is not the top half of a float32): use master_weights=True"
        )
    if sr and master is False and dtype != torch.bfloat16 and sdt is not torch.bfloat16:
        raise ValueError(
            f"fusedlr.AdamW: stochastic_rounding=True rounds bfloat16 params and moments, but {where} and "
            f"state_dtype={sdt}: put them in a param group with stochastic_rounding=False"
        )


def init_master(p: Tensor, state: dict[str, Any], mode: object) -> None:
    """Give ``state`` the master key of ``mode`` (and drop the other one).

    A master missing from the state (a new parameter, or a checkpoint saved without one) starts
    as the parameter's value; a full master converts to a remainder and back exactly (the param
    is then rewritten to the master rounded as the remainder mode rounds it, which changes it
    only at an exact tie).
    """
    master = state.pop("master_param", None)
    remainder = state.pop("master_remainder", None)
    if mode is True:
        if master is None:
            master = torch.zeros_like(p, dtype=torch.float32)
            source = local(p).detach() if remainder is None else join_master(local(p).detach(), local(remainder))
            local(master).copy_(source)
        state["master_param"] = master
    elif mode == "remainder":
        if remainder is None:
            remainder = torch.zeros_like(p, dtype=torch.int16)
            if master is not None:
                param, low = split_master(local(master))
                local(p).detach().copy_(param)
                local(remainder).copy_(low)
        state["master_remainder"] = remainder


# ---------------------------------------------------------------------------------------- RNG
def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2^32`` for ``0 <= x, c < 2^32`` in int64 without overflow (16-bit halves of c)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def hash32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (Wellons' lowbias32) of int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def tensor_keys(seed: int, pids: Tensor, steps: Tensor) -> Tensor:
    """int64 ``[n]``: the per-tensor ``key`` from each tensor's pid and step (see the module docstring)."""
    base = hash32(hash32(torch.full_like(pids, seed)) ^ pids)
    return hash32(hash32(base ^ (steps & _M32)) ^ ((steps >> 32) & _M32))


def element_index(t: Tensor) -> Tensor:
    """int64 tensor shaped like ``t``: each element's offset in memory from ``t``'s first element."""
    if t.is_contiguous():
        return torch.arange(t.numel(), dtype=torch.int64, device=t.device).view(t.shape)
    index = torch.zeros((), dtype=torch.int64, device=t.device)
    for d, (size, stride) in enumerate(zip(t.shape, t.stride())):
        shape = [1] * t.dim()
        shape[d] = size
        index = index + (torch.arange(size, dtype=torch.int64, device=t.device) * stride).view(shape)
    return index.expand(t.shape)


def random_bits(key: Tensor, stream: int, index: Tensor) -> Tensor:
    """The 32 random bits ``r`` of every element (int64 in [0, 2^32)) for one tensor's ``key`` (0-d)."""
    ka = hash32(key ^ stream)
    kb = hash32(ka ^ _GOLDEN)
    return hash32(((hash32((index & _M32) ^ ka) ^ kb) + (index >> 32)) & _M32)


# ---------------------------------------------------------------------------------------- rounding
def _bits(x: Tensor) -> Tensor:
    """The float32 bits of ``x`` as int64 in [0, 2^32)."""
    return x.view(torch.int32).to(torch.int64) & _M32


def _from_bits(u: Tensor) -> Tensor:
    """float32 with the bits ``u`` (int64 in [0, 2^32))."""
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).view(torch.float32)


def stochastic_round_bf16(x: Tensor, r: Tensor) -> Tensor:
    """float32 ``x`` rounded to bfloat16 up or down at random (unbiased), with the random bits ``r``."""
    rounded = _from_bits((_bits(x) + (r >> 16)) & 0xFFFF0000).to(torch.bfloat16)
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), rounded)


def split_master(master: Tensor) -> tuple[Tensor, Tensor]:
    """(bfloat16 param, int16 remainder) storing the float32 ``master`` exactly (see the module docstring)."""
    u = _bits(master)
    lo = u & 0xFFFF
    hi = (u >> 16) + (lo >= 0x8000).to(torch.int64)
    nan = torch.isnan(master)
    hi = torch.where(nan, _bits(master.to(torch.bfloat16).to(torch.float32)) >> 16, hi)
    lo = torch.where(nan, torch.zeros_like(lo), lo)
    param = _from_bits((hi & 0xFFFF) << 16).to(torch.bfloat16)
    remainder = torch.where(lo >= 0x8000, lo - 0x10000, lo).to(torch.int16)
    return param, remainder


def join_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The float32 master stored as the bfloat16 ``param`` and the int16 ``remainder``."""
    hi = (param.view(torch.int16).to(torch.int64) & 0xFFFF) - (remainder < 0).to(torch.int64)
    return _from_bits(((hi & 0xFFFF) << 16) | (remainder.to(torch.int64) & 0xFFFF))
