"""Pass 2 kernel: the fused AdamW update of every tensor of a bucket, or of a launch set, in one launch.

Per program (one ``CHUNK`` of one tensor) the kernel evaluates, in float64 scalars, the applied
LR ``lr * sched(k)`` from the schedule table (``lr`` read from the device for a tensor LR), the clip coefficient from ``stats[0]``, the AMP
scale, and the bias corrections ``1 - beta^t = -expm1(t * log(beta))`` for the tensor's step
``t``; then it applies ``fusedlr.reference``'s per-element math in the state dtype (float32, or
float64 for float64 params) in the reference's evaluation order, with correctly rounded division and
square root and torch's fused multiply-adds in ``lerp`` and ``addcmul`` (float32 results equal the
reference's bit for bit where torch's square root is correctly rounded, as on CUDA). When
``found_inf > 0`` every load and store is masked off: nothing is written.

Folded step (``FOLDED``, ``fusedlr.control.FoldedUpdate``): one launch updates a launch set, several buckets of
one param, grad and moment dtype, amsgrad and precision mode whatever their param groups (a single bucket is a set
of one). Each tensor's row names its segment (its bucket), whose row of the segment table (``SEGMENT_FIELDS``,
read once per program) holds the group's hyperparameters (a float LR, or the address and dtype of a tensor LR;
``maximize`` at run time), the bucket's ``applied_lr`` slot, the address and length of its ``steps``, its
``pids`` and its first program. The scale is GradScaler's (``FROM_SCALE``, inverted in the kernel), the update is
skipped also when ``stats[1] > 0`` (``SKIP_NONFINITE``), ``steps`` hold the updates applied before (the kernel
uses ``steps + 1``), a segment's first program writes ``applied_lr[slot]``; in the set's last launch
(``EPILOGUE``) the last program to arrive (an integer arrival counter, left zero, as in pass 1) writes
``grad_norm`` (``HAS_NORM_OUT``) and ``found_inf`` (``HAS_FOUND_INF_OUT``) and, when applied, advances every step
counter of every bucket of the set (zero-size tensors' too) and ``k`` (``ADVANCE_K``): every program of the set
has read them (a set split by alignment ran its first launch before on the stream).

Low-precision modes (constexpr flags, so the default mode's code is unchanged): ``MASTER`` reads and
writes the fp32 master and writes the param rounded to nearest from it, ``REMAINDER`` joins the param
and its int16 remainder into the exact fp32 master and splits the result again, moments stored in
``M_DTYPE`` (bfloat16, or float32 for float64 params) are widened on load and rounded on store, and
``STOCHASTIC`` rounds the bfloat16 values stored without master (param, moments) with random bits
keyed by (seed, pid, the tensor's step, stream, element offset): ``fusedlr.precision``'s spec, bit for
bit (helpers in ``precision.py``).
"""

import math
import struct
from collections.abc import Callable, Sequence
from functools import partial

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..bucket import Bucket
from ..control import CLIP_EPS, FoldedUpdate, GroupHyper, StepControl
from ..precision import Streams
from .grad_stats import TL_DTYPES, unscale_factor
from .precision import join_master, round_nearest, split_master, store_value, tensor_key
from .schedule import schedule_constexprs, schedule_multiplier
from .tables import (
    BLOCK,
    FIELD_FIRST,
    FIELD_M,
    FIELD_MASTER,
    FIELD_NUMEL,
    FIELD_P,
    FIELD_SEG,
    FIELD_STEP,
    FIELD_V,
    FIELD_VMAX,
    ITERS,
    ROW,
    LaunchTables,
    segment_table,
)

__all__ = ["SEGMENT_FIELDS", "prepare_launch", "prepare_set_launch"]

#: The int64 columns of a segment table row (one row per bucket of a launch set): the first eight are float64
#: bits (the group's float LR, 0 for a tensor LR; ``1 - beta1``, the lerp weight; ``beta2``, ``1 - beta2``,
#: ``log(beta1)``, ``log(beta2)``, ``eps``, ``weight_decay``), then the tensor LR's address and kind (0: a float
#: LR, 1: float32, 2: float64), ``maximize``, the ``applied_lr`` slot, the address and length of the bucket's
#: ``steps``, the address of its ``precision.pids`` (0 without) and its first program.
SEGMENT_FIELDS = ("lr", "lerp_weight", "beta2", "one_minus_beta2", "log_beta1", "log_beta2", "eps", "weight_decay",
                  "lr_addr", "lr_kind", "maximize", "lr_index", "steps", "n_steps", "pids", "first")
_S = {name: tl.constexpr(i) for i, name in enumerate(SEGMENT_FIELDS)}
_S_LR, _S_LERP_WEIGHT, _S_BETA2, _S_ONE_MINUS_BETA2 = _S["lr"], _S["lerp_weight"], _S["beta2"], _S["one_minus_beta2"]
_S_LOG_BETA1, _S_LOG_BETA2, _S_EPS, _S_WEIGHT_DECAY = _S["log_beta1"], _S["log_beta2"], _S["eps"], _S["weight_decay"]
_S_LR_ADDR, _S_LR_KIND, _S_MAXIMIZE, _S_LR_INDEX = _S["lr_addr"], _S["lr_kind"], _S["maximize"], _S["lr_index"]
_S_STEPS, _S_N_STEPS, _S_PIDS, _S_FIRST = _S["steps"], _S["n_steps"], _S["pids"], _S["first"]
_SEG_ROW = tl.constexpr(len(SEGMENT_FIELDS))
#: ``lr_kind`` of a tensor LR, by dtype.
_LR_KINDS = {torch.float32: 1, torch.float64: 2}

# The RNG stream of each stored tensor, as kernel constants.
_PARAM = tl.constexpr(Streams.PARAM)
_EXP_AVG = tl.constexpr(Streams.EXP_AVG)
_EXP_AVG_SQ = tl.constexpr(Streams.EXP_AVG_SQ)
_MAX_EXP_AVG_SQ = tl.constexpr(Streams.MAX_EXP_AVG_SQ)
#: Threads of a program (``num_warps=4``): the width of the epilogue's blocks.
_LANES = tl.constexpr(128)


@triton.jit
def _expm1(x):
    """``exp(x) - 1`` without cancellation for small ``|x|`` (Kahan's trick), float64."""
    u = tl.exp(x)
    um1 = u - 1.0
    log_u = tl.log(tl.where((u == 1.0) | (u == 0.0), 2.0, u))
    r = um1 * x / log_u
    r = tl.where(u == 1.0, x, r)
    return tl.where(um1 == -1.0, -1.0, r)


@triton.jit
def _div(a, b, S_DTYPE: tl.constexpr):
    if S_DTYPE == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(a, S_DTYPE: tl.constexpr):
    if S_DTYPE == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def _at(ptr, offs, ALIGNED: tl.constexpr, BLOCK_: tl.constexpr):
    """``ptr + offs``; with ``ALIGNED``, declared 16-byte aligned and contiguous (vector accesses)."""
    ptrs = ptr + offs
    if ALIGNED:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, 16), BLOCK_)
    return ptrs


@triton.jit
def _load(ptrs, offs, numel, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=offs < numel, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _store(ptrs, x, offs, numel, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, x, mask=offs < numel)
    else:
        tl.store(ptrs, x)


@triton.jit
def _skipped(found_inf_ptr, stats_ptr, HAS_FOUND_INF: tl.constexpr, SKIP_NONFINITE: tl.constexpr,
             VOLATILE: tl.constexpr = False):
    """Whether the step is skipped: ``found_inf > 0``, or (``SKIP_NONFINITE``) ``stats[1] > 0`` (``VOLATILE``:
    loaded again, not reused from earlier loads, which would keep the flag live across the element loop)."""
    skip = tl.full((), 0, tl.int1)
    if HAS_FOUND_INF:
        skip = skip | (tl.load(found_inf_ptr, volatile=VOLATILE) > 0.0)
    if SKIP_NONFINITE:
        skip = skip | (tl.load(stats_ptr + 1, volatile=VOLATILE) > 0.0)
    return skip


@triton.jit
def _epilogue(arrived_ptr, segs_ptr, n_segs, k_ptr, found_inf_ptr, stats_ptr, norm_out_ptr, found_inf_out_ptr,
              HAS_FOUND_INF: tl.constexpr, SKIP_NONFINITE: tl.constexpr, ADVANCE_K: tl.constexpr,
              HAS_NORM_OUT: tl.constexpr, HAS_FOUND_INF_OUT: tl.constexpr, LANES: tl.constexpr):
    """A folded launch's epilogue: the last program to arrive writes the step's norm and found_inf outputs,
    advances the step counters of the ``n_segs`` segments (and ``k``) when the update is applied (``_skipped``,
    loaded again), and leaves the arrival counter zero.

    Its single values are read and written through lane 0 of ``LANES``-wide blocks, not as scalars: a scalar
    access's one-thread predicate is shared with the prologue's and would be kept live across the element loop
    (sm_90, fp32: 72 registers and a spill inside the counters' loop, against one spill outside any loop)."""
    tl.debug_barrier()  # every thread of this program has read its step and k
    if tl.atomic_add(arrived_ptr, 1) == tl.num_programs(0) - 1:  # acq_rel: every program has read them
        lane = tl.arange(0, LANES)
        first = lane == 0
        at = lane * 0  # every lane at the single value
        skip = _skipped(found_inf_ptr + at, stats_ptr + at, HAS_FOUND_INF, SKIP_NONFINITE, True)
        if HAS_NORM_OUT:
            tl.store(norm_out_ptr + at, tl.sqrt_rn(tl.load(stats_ptr + at, volatile=True)), mask=first)
        if HAS_FOUND_INF_OUT:
            tl.store(found_inf_out_ptr + at, tl.where(skip, 1.0, 0.0).to(tl.float32), mask=first)
        for s in range(0, n_segs):
            seg = segs_ptr + s * _SEG_ROW
            steps_ptr = tl.load(seg + _S_STEPS).to(tl.pointer_type(tl.int64))
            n_steps = tl.load(seg + _S_N_STEPS)
            for lo in range(0, n_steps, LANES):
                idx = lo + lane
                mask = (idx < n_steps) & ~skip
                tl.store(steps_ptr + idx, tl.load(steps_ptr + idx, mask=mask, other=0) + 1, mask=mask)
        if ADVANCE_K:
            tl.store(k_ptr + at, tl.load(k_ptr + at) + 1, mask=first & ~skip)
        tl.store(arrived_ptr + at, at.to(tl.int32), mask=first)  # ready for the next launch (and graph replay)


@triton.jit
def _adamw_block(
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr, offs, numel, key,
    scale, maximize, decay, step_size, bias2_sqrt, w, w_minus_1, small, b2, omb2, eps_s,
    HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, AMSGRAD: tl.constexpr,
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
    MASTER: tl.constexpr, REMAINDER: tl.constexpr, STOCHASTIC: tl.constexpr,
    MASKED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_: tl.constexpr,
):
    """The per-element update of ``BLOCK_`` elements at ``offs`` (masked to ``numel`` if ``MASKED``).

    ``p`` is read from the fp32 master (``MASTER``: at ``master_ptr``; ``REMAINDER``: joined from the
    param and the int16 remainder at ``master_ptr``); moments are ``M_DTYPE`` in memory, computed in
    ``S_DTYPE``; ``key``: the tensor's RNG key (``STOCHASTIC``); ``maximize``: negate the gradient (with
    ``MAXIMIZE``; a run-time flag of the tensor's group).
    """
    g_at = _at(g_ptr, offs, ALIGNED, BLOCK_)
    p_at = _at(p_ptr, offs, ALIGNED, BLOCK_)
    m_at = _at(m_ptr, offs, ALIGNED, BLOCK_)
    v_at = _at(v_ptr, offs, ALIGNED, BLOCK_)
    g = _load(g_at, offs, numel, MASKED).to(S_DTYPE)
    if HAS_SCALE:
        g = g * scale
    if MAXIMIZE:
        g = tl.where(maximize, -g, g)
    if MASTER or REMAINDER:
        master_at = _at(master_ptr, offs, ALIGNED, BLOCK_)
    if MASTER:
        p = _load(master_at, offs, numel, MASKED)
    elif REMAINDER:
        p = join_master(_load(p_at, offs, numel, MASKED), _load(master_at, offs, numel, MASKED))
    else:
        p = _load(p_at, offs, numel, MASKED).to(S_DTYPE)
    m = _load(m_at, offs, numel, MASKED).to(S_DTYPE)
    v = _load(v_at, offs, numel, MASKED).to(S_DTYPE)
    p = p * decay
    m = tl.where(small, tl.fma(w, g - m, m), tl.fma(w_minus_1, g - m, g))  # torch.lerp (fused, CPU and CUDA)
    v = tl.fma(omb2 * g, g, v * b2)  # torch.addcmul (fused, CPU and CUDA)
    if AMSGRAD:
        vmax_at = _at(vmax_ptr, offs, ALIGNED, BLOCK_)
        vmax = tl.maximum(_load(vmax_at, offs, numel, MASKED).to(S_DTYPE), v, propagate_nan=tl.PropagateNan.ALL)
        _store(vmax_at, store_value(vmax, key, _MAX_EXP_AVG_SQ, offs, M_DTYPE, STOCHASTIC), offs, numel, MASKED)
        denom = _div(_sqrt(vmax, S_DTYPE), bias2_sqrt, S_DTYPE) + eps_s
    else:
        denom = _div(_sqrt(v, S_DTYPE), bias2_sqrt, S_DTYPE) + eps_s
    _store(m_at, store_value(m, key, _EXP_AVG, offs, M_DTYPE, STOCHASTIC), offs, numel, MASKED)
    _store(v_at, store_value(v, key, _EXP_AVG_SQ, offs, M_DTYPE, STOCHASTIC), offs, numel, MASKED)
    p = p - _div(m, _div(denom, step_size, S_DTYPE), S_DTYPE)  # the reference's order (torch.addcdiv)
    if MASTER:
        _store(master_at, p, offs, numel, MASKED)
        _store(p_at, round_nearest(p, P_DTYPE), offs, numel, MASKED)
    elif REMAINDER:
        high, low = split_master(p)
        _store(p_at, high, offs, numel, MASKED)
        _store(master_at, low, offs, numel, MASKED)
    else:
        _store(p_at, store_value(p, key, _PARAM, offs, P_DTYPE, STOCHASTIC), offs, numel, MASKED)


@triton.jit(do_not_specialize=["seed"])
def _adamw_kernel(
    rows_ptr,
    blocks_ptr,
    order_ptr,
    grads_ptr,
    steps_ptr,
    pids_ptr,
    k_ptr,
    sched_ptr,
    stats_ptr,
    inv_scale_ptr,
    found_inf_ptr,
    lr_ptr,
    applied_lr_ptr,
    arrived_ptr,
    norm_out_ptr,
    found_inf_out_ptr,
    segs_ptr,
    n_segs,
    lr: tl.float64,
    lerp_weight: tl.float64,
    beta2: tl.float64,
    one_minus_beta2: tl.float64,
    log_beta1: tl.float64,
    log_beta2: tl.float64,
    eps: tl.float64,
    weight_decay: tl.float64,
    max_norm: tl.float64,
    seed: tl.int64,
    CLIP_EPS_: tl.constexpr,
    SCHED_KIND: tl.constexpr,
    SCHED_N: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_LR_TENSOR: tl.constexpr,
    HAS_APPLIED_LR: tl.constexpr,
    FOLDED: tl.constexpr,
    FROM_SCALE: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_NORM_OUT: tl.constexpr,
    HAS_FOUND_INF_OUT: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ADVANCE_K: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    MASTER: tl.constexpr,
    REMAINDER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ROW_: tl.constexpr,
    F_P: tl.constexpr,
    F_M: tl.constexpr,
    F_V: tl.constexpr,
    F_VMAX: tl.constexpr,
    F_NUMEL: tl.constexpr,
    F_STEP: tl.constexpr,
    F_FIRST: tl.constexpr,
    F_MASTER: tl.constexpr,
    F_SEG: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_: tl.constexpr,
    ITERS_: tl.constexpr,
):
    """One program: chunk ``pid`` of the bucket or set (see ``tables.py`` for the addressing), ``pid`` read from
    ``order_ptr`` at the program's index (a launch covers a slice of ``LaunchTables.order``). Unfolded: the
    hyperparameters are the float arguments, the step counters ``steps_ptr``; ``FOLDED``: both are read from the
    tensor's segment (``segs_ptr``)."""
    # Float arguments as float64 scalars (the interpreter passes plain Python floats).
    lr = tl.full((), lr, tl.float64)
    lerp_weight = tl.full((), lerp_weight, tl.float64)
    beta2 = tl.full((), beta2, tl.float64)
    one_minus_beta2 = tl.full((), one_minus_beta2, tl.float64)
    log_beta1 = tl.full((), log_beta1, tl.float64)
    log_beta2 = tl.full((), log_beta2, tl.float64)
    eps = tl.full((), eps, tl.float64)
    weight_decay = tl.full((), weight_decay, tl.float64)
    max_norm = tl.full((), max_norm, tl.float64)

    # Which tensor and which chunk of it.
    pid = tl.load(order_ptr + tl.program_id(0).to(tl.int64))
    row = tl.load(blocks_ptr + pid)
    base = rows_ptr + row * ROW_
    numel = tl.load(base + F_NUMEL)
    start = (pid - tl.load(base + F_FIRST)) * (BLOCK_ * ITERS_)
    p_ptr = tl.load(base + F_P).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(base + F_M).to(tl.pointer_type(M_DTYPE))
    v_ptr = tl.load(base + F_V).to(tl.pointer_type(M_DTYPE))
    g_ptr = tl.load(grads_ptr + row).to(tl.pointer_type(G_DTYPE))
    index = tl.load(base + F_STEP)  # the tensor's index in its bucket
    if FOLDED:  # the tensor's segment: its group's hyperparameters, its bucket's counters
        seg = segs_ptr + tl.load(base + F_SEG) * _SEG_ROW
        lr = tl.load(seg + _S_LR).to(tl.float64, bitcast=True)
        lerp_weight = tl.load(seg + _S_LERP_WEIGHT).to(tl.float64, bitcast=True)
        beta2 = tl.load(seg + _S_BETA2).to(tl.float64, bitcast=True)
        one_minus_beta2 = tl.load(seg + _S_ONE_MINUS_BETA2).to(tl.float64, bitcast=True)
        log_beta1 = tl.load(seg + _S_LOG_BETA1).to(tl.float64, bitcast=True)
        log_beta2 = tl.load(seg + _S_LOG_BETA2).to(tl.float64, bitcast=True)
        eps = tl.load(seg + _S_EPS).to(tl.float64, bitcast=True)
        weight_decay = tl.load(seg + _S_WEIGHT_DECAY).to(tl.float64, bitcast=True)
        maximize = tl.load(seg + _S_MAXIMIZE) != 0
        lr_index = tl.load(seg + _S_LR_INDEX)
        first = tl.load(seg + _S_FIRST)
        pids_at = tl.load(seg + _S_PIDS).to(tl.pointer_type(tl.int64)) + index
        step = tl.load(tl.load(seg + _S_STEPS).to(tl.pointer_type(tl.int64)) + index)
        step = step + 1  # steps hold the updates applied before this one
    else:
        maximize = tl.full((), 1, tl.int1)
        lr_index = 0
        first = 0
        pids_at = pids_ptr + index
        step = tl.load(steps_ptr + index)
    t = step.to(tl.float64)

    # Step scalars, float64.
    k = tl.load(k_ptr).to(tl.float64)
    if HAS_LR_TENSOR:
        if FOLDED:  # a float32 or float64 tensor LR, or (kind 0) the segment's float LR
            lr_kind = tl.load(seg + _S_LR_KIND)
            lr_addr = tl.load(seg + _S_LR_ADDR)
            lr32 = tl.load(lr_addr.to(tl.pointer_type(tl.float32)), mask=lr_kind == 1, other=0.0)
            lr64 = tl.load(lr_addr.to(tl.pointer_type(tl.float64)), mask=lr_kind == 2, other=0.0)
            lr = tl.where(lr_kind == 1, lr32.to(tl.float64), tl.where(lr_kind == 2, lr64, lr))
        else:
            lr = tl.load(lr_ptr).to(tl.float64)
    lr_t = lr * schedule_multiplier(sched_ptr, k, SCHED_KIND, SCHED_N)
    bias1 = -_expm1(t * log_beta1)
    bias2_sqrt = tl.sqrt(-_expm1(t * log_beta2))
    decay = (1.0 - lr_t * weight_decay).to(S_DTYPE)
    step_size = (lr_t / bias1).to(S_DTYPE)
    bias2_sqrt = bias2_sqrt.to(S_DTYPE)
    if HAS_CLIP:
        coef = max_norm / (tl.sqrt(tl.load(stats_ptr).to(tl.float64)) + CLIP_EPS_)
        scale = tl.where(coef >= 1.0, 1.0, coef)  # NaN stays NaN
        if HAS_INV_SCALE:
            scale = scale * unscale_factor(inv_scale_ptr, FROM_SCALE).to(tl.float64)
        scale = scale.to(S_DTYPE)
    elif HAS_INV_SCALE:
        scale = unscale_factor(inv_scale_ptr, FROM_SCALE).to(S_DTYPE)
    else:
        scale = tl.full((), 1.0, S_DTYPE)  # unused
    skip = _skipped(found_inf_ptr, stats_ptr, HAS_FOUND_INF, SKIP_NONFINITE)
    if HAS_APPLIED_LR:
        tl.store(applied_lr_ptr + lr_index, lr_t, mask=(pid == first) & ~skip)
    if HAS_FOUND_INF or SKIP_NONFINITE:
        # Skipped step: no element in range, so every load and store is masked off.
        numel = tl.where(skip, 0, numel)

    # Elementwise constants in the state dtype (rounded once, as the reference does).
    w = lerp_weight.to(S_DTYPE)
    w_minus_1 = w - 1.0
    small = lerp_weight < 0.5
    b2 = beta2.to(S_DTYPE)
    omb2 = one_minus_beta2.to(S_DTYPE)
    eps_s = eps.to(S_DTYPE)
    if AMSGRAD:
        vmax_ptr = tl.load(base + F_VMAX).to(tl.pointer_type(M_DTYPE))
    else:
        vmax_ptr = v_ptr  # never accessed
    if MASTER:
        master_ptr = tl.load(base + F_MASTER).to(tl.pointer_type(tl.float32))
    elif REMAINDER:
        master_ptr = tl.load(base + F_MASTER).to(tl.pointer_type(tl.int16))
    else:
        master_ptr = p_ptr  # never accessed
    if STOCHASTIC:
        key = tensor_key(tl.full((), seed, tl.int64), tl.load(pids_at), step)
    else:
        key = tl.full((), 0, tl.uint32)  # unused

    for it in range(ITERS_):
        lo = start + it * BLOCK_
        offs = lo + tl.arange(0, BLOCK_).to(tl.int64)
        if ALIGNED:
            if lo + BLOCK_ <= numel:  # a full block: unmasked, vectorized accesses
                _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr, offs, numel, key, scale,
                             maximize, decay, step_size, bias2_sqrt, w, w_minus_1, small, b2, omb2, eps_s,
                             HAS_CLIP or HAS_INV_SCALE, MAXIMIZE, AMSGRAD, P_DTYPE, S_DTYPE, M_DTYPE, MASTER, REMAINDER,
                             STOCHASTIC, False, True, BLOCK_)
            else:
                _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr, offs, numel, key, scale,
                             maximize, decay, step_size, bias2_sqrt, w, w_minus_1, small, b2, omb2, eps_s,
                             HAS_CLIP or HAS_INV_SCALE, MAXIMIZE, AMSGRAD, P_DTYPE, S_DTYPE, M_DTYPE, MASTER, REMAINDER,
                             STOCHASTIC, True, True, BLOCK_)
        else:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr, offs, numel, key, scale,
                         maximize, decay, step_size, bias2_sqrt, w, w_minus_1, small, b2, omb2, eps_s,
                         HAS_CLIP or HAS_INV_SCALE, MAXIMIZE, AMSGRAD, P_DTYPE, S_DTYPE, M_DTYPE, MASTER, REMAINDER,
                         STOCHASTIC, True, False, BLOCK_)
    if EPILOGUE:
        _epilogue(arrived_ptr, segs_ptr, n_segs, k_ptr, found_inf_ptr, stats_ptr, norm_out_ptr, found_inf_out_ptr,
                  HAS_FOUND_INF, SKIP_NONFINITE, ADVANCE_K, HAS_NORM_OUT, HAS_FOUND_INF_OUT, _LANES)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0.0 else -math.inf


def _hyper_floats(hyper: GroupHyper) -> tuple[float, ...]:
    """The float hyperparameters as the kernel reads them (``SEGMENT_FIELDS``' first eight; lr 0 for a tensor)."""
    beta1, beta2 = float(hyper.beta1), float(hyper.beta2)
    lr = 0.0 if isinstance(hyper.lr, Tensor) else float(hyper.lr)
    return (lr, 1.0 - beta1, beta2, 1.0 - beta2, _log(beta1), _log(beta2), float(hyper.eps),
            float(hyper.weight_decay))


def _segment_row(bucket: Bucket, hyper: GroupHyper, fold: FoldedUpdate, first: int) -> list[int]:
    """One bucket's row of a segment table (``SEGMENT_FIELDS``); ``first``: its first program."""
    floats = _hyper_floats(hyper)
    lr_tensor = hyper.lr if isinstance(hyper.lr, Tensor) else None
    if lr_tensor is not None and (lr_tensor.dtype not in _LR_KINDS or lr_tensor.device != bucket.device):
        raise ValueError(f"a tensor lr must be a float32 or float64 tensor on {bucket.device}")
    prec = bucket.precision
    return [
        *struct.unpack(f"<{len(floats)}q", struct.pack(f"<{len(floats)}d", *floats)),
        lr_tensor.data_ptr() if lr_tensor is not None else 0,
        _LR_KINDS[lr_tensor.dtype] if lr_tensor is not None else 0,
        int(bool(hyper.maximize)),
        fold.group,
        bucket.steps.data_ptr(),
        bucket.steps.numel(),
        prec.pids.data_ptr() if prec is not None and prec.stochastic else 0,
        first,
    ]


def _constexprs(bucket: Bucket, grad_dtype: torch.dtype, ctrl: StepControl, scale: Tensor | None,
                fold: FoldedUpdate | None, lr_tensor: bool, maximize: bool, applied_lr: bool) -> dict:
    """The kernel's specialization for ``bucket``'s dtypes, amsgrad and precision mode and the step's switches."""
    kind, n = schedule_constexprs(ctrl.schedule)
    prec = bucket.precision
    param_dtype = bucket.params[0].dtype
    return dict(
        CLIP_EPS_=CLIP_EPS,
        SCHED_KIND=kind,
        SCHED_N=n,
        HAS_CLIP=ctrl.max_norm is not None,
        HAS_INV_SCALE=scale is not None,
        HAS_FOUND_INF=ctrl.found_inf is not None,
        HAS_LR_TENSOR=lr_tensor,
        HAS_APPLIED_LR=applied_lr,
        FOLDED=fold is not None,
        FROM_SCALE=fold is not None and fold.scale is not None,
        SKIP_NONFINITE=fold is not None and fold.skip_nonfinite,
        HAS_NORM_OUT=fold is not None and fold.norm_out is not None,
        HAS_FOUND_INF_OUT=fold is not None and fold.found_inf_out is not None,
        ADVANCE_K=fold is not None and fold.advance_k,
        AMSGRAD=bucket.max_exp_avg_sqs is not None,
        MAXIMIZE=maximize,
        P_DTYPE=TL_DTYPES[param_dtype],
        G_DTYPE=TL_DTYPES[grad_dtype],
        S_DTYPE=tl.float64 if param_dtype == torch.float64 else tl.float32,
        M_DTYPE=TL_DTYPES[bucket.exp_avgs[0].dtype],
        MASTER=prec is not None and prec.master is not None,
        REMAINDER=prec is not None and prec.remainder is not None,
        STOCHASTIC=prec is not None and prec.stochastic,
        ROW_=ROW,
        F_P=FIELD_P,
        F_M=FIELD_M,
        F_V=FIELD_V,
        F_VMAX=FIELD_VMAX,
        F_NUMEL=FIELD_NUMEL,
        F_STEP=FIELD_STEP,
        F_FIRST=FIELD_FIRST,
        F_MASTER=FIELD_MASTER,
        F_SEG=FIELD_SEG,
        BLOCK_=BLOCK,
        ITERS_=ITERS,
        num_warps=4,
        enable_fp_fusion=False,
    )


def _check(ctrl: StepControl, fold: FoldedUpdate | None) -> None:
    if ctrl.max_norm is not None and ctrl.stats is None:
        raise ValueError("clipping needs the reduction pass (ctrl.stats)")
    if fold is not None and (fold.skip_nonfinite or fold.norm_out is not None) and ctrl.stats is None:
        raise ValueError("a folded update's skip_nonfinite and norm_out need the reduction pass (ctrl.stats)")
    if fold is not None and fold.scale is not None and ctrl.inv_scale is not None:
        raise ValueError("pass ctrl.inv_scale or fold.scale, not both")
    if ctrl.schedule is not None and ctrl.schedule_table is None:
        raise ValueError("ctrl.schedule is set but ctrl.schedule_table is None")


def _step_args(ctrl: StepControl, fold: FoldedUpdate | None, scale: Tensor | None) -> tuple:
    """The kernel arguments from ``k`` to ``found_inf_ptr`` (the step's control tensors; ``k`` for those absent)."""
    dummy = ctrl.k
    reads_stats = ctrl.max_norm is not None or (fold is not None and (fold.skip_nonfinite or fold.norm_out is not None))
    return (
        ctrl.k,
        ctrl.schedule_table if ctrl.schedule is not None else dummy,
        ctrl.stats if reads_stats else dummy,
        scale if scale is not None else dummy,
        ctrl.found_inf if ctrl.found_inf is not None else dummy,
    )


def prepare_launch(
    tables: LaunchTables,
    grads_table: Tensor,
    bucket: Bucket,
    grad_dtype: torch.dtype,
    hyper: GroupHyper,
    ctrl: StepControl,
    applied_lr: Tensor | None = None,
) -> Callable[[], None]:
    """The (unfolded) launch of the AdamW update of every tensor of ``bucket`` (see the module docstring), checked
    and bound, to enqueue by calling it; ``bucket.steps`` hold this update's step numbers; program 0 writes
    ``lr_t`` into ``applied_lr`` (0-d float64) unless the step is skipped. Call it only with
    ``tables.n_blocks > 0``."""
    _check(ctrl, None)
    dummy = ctrl.k
    lr_tensor = hyper.lr if isinstance(hyper.lr, Tensor) else None
    prec = bucket.precision
    args = (
        grads_table,
        bucket.steps,
        prec.pids if prec is not None else dummy,
        *_step_args(ctrl, None, ctrl.inv_scale),
        lr_tensor if lr_tensor is not None else dummy,
        applied_lr if applied_lr is not None else dummy,
        tables.update_arrived,
        dummy,
        dummy,
        dummy,
        0,
        *_hyper_floats(hyper),
        float(ctrl.max_norm) if ctrl.max_norm is not None else 0.0,
        prec.seed if prec is not None else 0,
    )
    constexprs = _constexprs(bucket, grad_dtype, ctrl, ctrl.inv_scale, None, lr_tensor is not None,
                             bool(hyper.maximize), applied_lr is not None)
    return partial(_launch_parts, tables, tables.parts, args, constexprs, False)


def prepare_set_launch(
    tables: LaunchTables,
    grads_table: Tensor,
    buckets: Sequence[Bucket],
    grad_dtype: torch.dtype,
    hypers: Sequence[GroupHyper],
    ctrl: StepControl,
    applied_lr: Tensor | None,
    folds: Sequence[FoldedUpdate],
) -> Callable[[], None]:
    """The folded launch of the AdamW update of every tensor of the launch set ``buckets`` (``tables``: their
    ``set_tables``; see the module docstring), checked and bound, to enqueue by calling it: bucket ``i``'s first
    program writes its ``lr_t`` into ``applied_lr[folds[i].group]`` (the ``[groups]`` float64 buffer; None: not
    written) unless the step is skipped; ``steps`` hold the updates applied before. The scale and inf check are the
    last fold's (every fold has the same), and only it has the step's outputs. Every bucket must have a program."""
    last = folds[-1]
    _check(ctrl, last)
    if any(f.advance_k or f.norm_out is not None or f.found_inf_out is not None for f in folds[:-1]):
        raise ValueError("fusedlr backend='triton': only the last update of a launch set writes the step's outputs")
    firsts = tables.segment_first
    if len(firsts) != len(buckets) or min(firsts) < 0:
        raise ValueError("fusedlr backend='triton': a folded update of a bucket without a program")
    rows = [_segment_row(b, h, f, first) for b, h, f, first in zip(buckets, hypers, folds, firsts)]
    segments = segment_table(tables, rows, buckets[0].device)
    dummy = ctrl.k
    prec = buckets[0].precision
    scale = last.scale if last.scale is not None else ctrl.inv_scale
    args = (
        grads_table,
        dummy,
        dummy,
        *_step_args(ctrl, last, scale),
        dummy,
        applied_lr if applied_lr is not None else dummy,
        tables.update_arrived,
        last.norm_out if last.norm_out is not None else dummy,
        last.found_inf_out if last.found_inf_out is not None else dummy,
        segments,
        len(buckets),
        *(0.0,) * 8,
        float(ctrl.max_norm) if ctrl.max_norm is not None else 0.0,
        prec.seed if prec is not None else 0,
    )
    constexprs = _constexprs(buckets[0], grad_dtype, ctrl, scale, last, any(isinstance(h.lr, Tensor) for h in hypers),
                             any(h.maximize for h in hypers), applied_lr is not None)
    # The programs of aligned tensors (vectorized specialization) and the others' (scalar): one launch each, two
    # only when the set has both (``tables.parts``); the last one has the epilogue.
    return partial(_launch_parts, tables, tables.parts, args, constexprs, True)


def _launch_parts(
    tables: LaunchTables, parts: list[tuple[Tensor, bool]], args: tuple, constexprs: dict, folded: bool
) -> None:
    """Enqueue one launch per ``(slice of tables.order, ALIGNED)``, of ``len(slice)`` programs (folded: the last
    with the ``EPILOGUE``)."""
    for i, (piece, aligned) in enumerate(parts):
        _adamw_kernel[(piece.numel(),)](tables.rows, tables.blocks, piece, *args, **constexprs, ALIGNED=aligned,
                                        EPILOGUE=folded and i == len(parts) - 1)
