"""Pass 1 kernel: multi-tensor sum of squares of the unscaled gradients and non-finite count.

One launch per bucket, or per launch set of buckets (``tables.set_tables``); every program reduces one
``CHUNK`` of one gradient in float32 (whatever the gradient dtype) and stores its partial results in the
``partials`` buffer; the last program to finish (an integer arrival counter decides) sums the partials of each
bucket in program order and adds the buckets' sums to ``out`` one after the other (the bits of one launch per
bucket): ``out[0] += sum((g.float() * inv_scale)^2)``, ``out[1] += number of non-finite elements`` (``RESET``:
writes them instead of adding, for a folded step's first launch).
``inv_scale`` is read from the device, or computed there from GradScaler's scale (``FROM_SCALE``,
``unscale_factor``). No floating-point atomics, so the result is bitwise reproducible.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tables import ALIGN, BLOCK, FIELD_FIRST, FIELD_NUMEL, ITERS, ROW, LaunchTables

__all__ = ["TL_DTYPES", "launch_grad_stats", "unscale_factor"]

#: torch dtype -> triton dtype of the tensors the kernels address.
TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


_INF = tl.constexpr(float("inf"))
#: Partials summed per iteration of the final reduction: one per thread (``num_warps=4``); a ``BLOCK``-wide sum
#: cost the kernel 48 registers instead of 36 (fp32, sm_90) and a spill across the barrier (bf16).
_SUM_LANES = tl.constexpr(128)


@triton.jit
def unscale_factor(ptr, FROM_SCALE: tl.constexpr):
    """The float32 gradient factor: ``*ptr`` (an inverse scale), or (``FROM_SCALE``) GradScaler's inverse of its
    scale ``*ptr``, ``float32(1 / float64(s))``, which a correctly rounded float32 division equals bit for bit."""
    if FROM_SCALE:
        s = tl.load(ptr)
        if s.dtype == tl.float64:  # a float64 scale: its inverse rounded once, to float32
            return (1.0 / s).to(tl.float32)
        else:
            return tl.div_rn(tl.full((), 1.0, tl.float32), s.to(tl.float32))
    else:
        return tl.load(ptr).to(tl.float32)


@triton.jit
def _grad_stats_kernel(
    rows_ptr,
    blocks_ptr,
    grads_ptr,
    inv_scale_ptr,
    out_ptr,
    partials_ptr,
    arrived_ptr,
    bounds_ptr,
    n_segs,
    HAS_INV_SCALE: tl.constexpr,
    FROM_SCALE: tl.constexpr,
    RESET: tl.constexpr,
    G_DTYPE: tl.constexpr,
    ROW_: tl.constexpr,
    F_NUMEL: tl.constexpr,
    F_FIRST: tl.constexpr,
    ALIGN_: tl.constexpr,
    BLOCK_: tl.constexpr,
    ITERS_: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(blocks_ptr + pid)
    numel = tl.load(rows_ptr + row * ROW_ + F_NUMEL)
    start = (pid - tl.load(rows_ptr + row * ROW_ + F_FIRST)) * (BLOCK_ * ITERS_)
    g_addr = tl.load(grads_ptr + row)
    vector = (g_addr % ALIGN_) == 0  # this gradient's full blocks take the vectorized path
    g_ptr = g_addr.to(tl.pointer_type(G_DTYPE))
    if HAS_INV_SCALE:
        inv_scale = unscale_factor(inv_scale_ptr, FROM_SCALE)
    acc = tl.zeros([BLOCK_], dtype=tl.float32)
    bad = tl.zeros([BLOCK_], dtype=tl.int32)
    for it in range(ITERS_):
        lo = start + it * BLOCK_
        offs = lo + tl.arange(0, BLOCK_).to(tl.int64)
        if (lo + BLOCK_ <= numel) & vector:  # a full block of an aligned gradient: unmasked, vectorized loads
            g = tl.load(tl.max_contiguous(tl.multiple_of(g_ptr + offs, ALIGN_), BLOCK_))
        else:
            g = tl.load(g_ptr + offs, mask=offs < numel, other=0.0)
        if G_DTYPE == tl.float64:
            finite = tl.abs(g) < _INF
        else:
            finite = tl.abs(g.to(tl.float32)) < _INF
        gf = g.to(tl.float32)
        if HAS_INV_SCALE:
            gf = gf * inv_scale
        acc += gf * gf
        bad += tl.where(finite, 0, 1)
    tl.store(partials_ptr + 2 * pid, tl.sum(acc, axis=0))
    tl.store(partials_ptr + 2 * pid + 1, tl.sum(bad, axis=0).to(tl.float32))
    tl.debug_barrier()
    n_programs = tl.num_programs(0)
    if tl.atomic_add(arrived_ptr, 1) == n_programs - 1:  # acq_rel: every other partial is visible
        if RESET:
            run_total = tl.full((), 0.0, tl.float32)
            run_count = tl.full((), 0.0, tl.float32)
        else:
            run_total = tl.load(out_ptr)
            run_count = tl.load(out_ptr + 1)
        for s in range(0, n_segs):  # each bucket's programs: bounds[s] to bounds[s + 1]
            end = tl.load(bounds_ptr + s + 1)
            total = tl.zeros([_SUM_LANES], dtype=tl.float32)
            count = tl.zeros([_SUM_LANES], dtype=tl.float32)
            for lo in range(tl.load(bounds_ptr + s), end, _SUM_LANES):
                idx = lo + tl.arange(0, _SUM_LANES)
                total += tl.load(partials_ptr + 2 * idx, mask=idx < end, other=0.0, volatile=True)
                count += tl.load(partials_ptr + 2 * idx + 1, mask=idx < end, other=0.0, volatile=True)
            run_total = run_total + tl.sum(total, axis=0)
            run_count = run_count + tl.sum(count, axis=0)
        tl.store(out_ptr, run_total)
        tl.store(out_ptr + 1, run_count)
        tl.store(arrived_ptr, 0)  # ready for the next launch (and CUDA-graph replay)


def launch_grad_stats(
    tables: LaunchTables,
    grads_table: Tensor,
    grad_dtype: torch.dtype,
    inv_scale: Tensor | None,
    out: Tensor,
    scale: Tensor | None = None,
    reset: bool = False,
) -> None:
    """Enqueue the reduction over every gradient of a bucket into ``out`` (float32 ``[2]``), unscaled by
    ``inv_scale`` or by GradScaler's ``scale`` (float32 0-d, inverted in the kernel; not both); ``reset``:
    write ``out`` instead of adding to it. Nothing is enqueued for a bucket without programs."""
    if inv_scale is not None and scale is not None:
        raise ValueError("pass inv_scale or scale, not both")
    if tables.n_blocks == 0:
        return
    factor = inv_scale if inv_scale is not None else scale
    _grad_stats_kernel[(tables.n_blocks,)](
        tables.rows,
        tables.blocks,
        grads_table,
        factor if factor is not None else out,
        out,
        tables.partials,
        tables.arrived,
        tables.segment_bounds,
        len(tables.segment_first),
        HAS_INV_SCALE=factor is not None,
        FROM_SCALE=scale is not None,
        RESET=reset,
        G_DTYPE=TL_DTYPES[grad_dtype],
        ROW_=ROW,
        F_NUMEL=FIELD_NUMEL,
        F_FIRST=FIELD_FIRST,
        ALIGN_=ALIGN,
        BLOCK_=BLOCK,
        ITERS_=ITERS,
        num_warps=4,
        enable_fp_fusion=False,
    )
