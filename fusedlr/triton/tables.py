"""Device-resident pointer tables for the multi-tensor launches, built once per bucket or launch set.

A launch covers every tensor of a bucket, or of a launch set (several buckets: ``set_tables``), with one
grid. Each program owns a chunk of ``CHUNK`` consecutive elements (``ITERS`` iterations of ``BLOCK``) of one
tensor, found through int64 device tables:

* ``rows`` ``[n_rows, ROW]``: per non-empty tensor, the addresses of param, exp_avg, exp_avg_sq and
  max_exp_avg_sq (0 without amsgrad), its element count, its index into its bucket's ``steps`` (and
  ``precision.pids``), the id of its first program, the address of its fp32 master or int16 remainder
  (0 without; ``fusedlr.precision``) and its segment: the position of its bucket in the launch set, the
  row of the set's segment table (``segment_table``) (``FIELD_*`` give the column of each);
* ``blocks`` ``[n_blocks]``: the row each program works on; the program's first element is
  ``(pid - rows[row, FIELD_FIRST]) * CHUNK``;
* ``order`` ``[n_blocks]``: the program ids for the update, those of tensors whose every address
  (gradient included) is ``ALIGN``-aligned first (``n_vector`` of them): the update runs them in a
  launch specialized for vector accesses and the rest in a scalar one (one launch when only one kind
  exists), so alignment is decided per tensor. Pass 1 (fewer registers) decides it per gradient at run time.

Gradient addresses live in a separate ``grads`` table ``[n_rows]``, re-uploaded (with ``order``) only
when the gradient tensors' addresses change (params and states are fixed for the bucket's life, gradients
may be new tensors every step). A folded update also reads a segment table (int64 ``[n_segments, n]``: per
bucket of the set, its hyperparameters and step-counter addresses, laid out by ``fusedlr.triton.adamw``),
re-uploaded only when its content changes. Uploads go through pinned host memory with ``non_blocking=True``,
so building or refreshing a table never waits for the device. Offsets are int64 throughout.

Tensors are addressed in storage order, so each must be dense (no gaps, no overlap) and the
states, masters (and gradients) must share the param's layout; the moments of a bucket share one
dtype (float32, float64 for float64 params, or a ``state_dtype``: bfloat16, or float32 for float64
params). A bucket whose params or states are not (``bucket_tables`` returns None) is left to the
reference backend; gradients of another layout are copied into the param's layout (read-only, so
the copy is safe).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..bucket import Bucket

__all__ = [
    "ALIGN",
    "BLOCK",
    "CHUNK",
    "FIELD_FIRST",
    "FIELD_M",
    "FIELD_MASTER",
    "FIELD_NUMEL",
    "FIELD_P",
    "FIELD_SEG",
    "FIELD_STEP",
    "FIELD_V",
    "FIELD_VMAX",
    "ITERS",
    "ROW",
    "LaunchTables",
    "addressable",
    "bucket_tables",
    "grad_table",
    "is_dense",
    "segment_table",
    "set_tables",
]

#: Elements per vector iteration of a program (fixed: no autotuning of an in-place kernel).
BLOCK = 1024
#: Iterations per program.
ITERS = 4
#: Elements per program.
CHUNK = BLOCK * ITERS

FIELD_P, FIELD_M, FIELD_V, FIELD_VMAX, FIELD_NUMEL, FIELD_STEP, FIELD_FIRST, FIELD_MASTER, FIELD_SEG = range(9)
#: int64 entries per row of the ``rows`` table.
ROW = 9
#: Byte alignment that lets the kernels use vector accesses on a tensor's full blocks (when every address
#: of that tensor, gradient included, has it; the kernels decide per tensor, at run time).
ALIGN = 16

_CACHE_KEY = "triton.tables"
_SETS_KEY = "triton.set_tables"
_ELIGIBLE_KEY = "triton.eligible"


@dataclass
class LaunchTables:
    """The launch tables of one bucket or launch set (device tensors) and what refreshing the grad table needs."""

    rows: Tensor  # int64 [n_rows, ROW]
    blocks: Tensor  # int64 [n_blocks]
    members: list[int]  # index of each row's tensor in the set's params, concatenated (the non-empty tensors)
    n_blocks: int
    partials: Tensor  # float32 [2 * n_blocks]: per-program (sum of squares, non-finite count) of pass 1
    arrived: Tensor  # int32 [1]: pass-1 programs done (zero between launches)
    update_arrived: Tensor  # int32 [1]: programs of a folded update launch done (zero between launches)
    rows_aligned: Tensor  # bool [n_rows] (host): every param, state and master address of the row is ALIGN-aligned
    block_rows: Tensor  # int64 [n_blocks] (host): what ``blocks`` holds
    segment_first: list[int]  # per segment (bucket of the set), the id of its first program (-1: none)
    segment_bounds: Tensor  # int64 [n_segments + 1]: segment s has the programs bounds[s] to bounds[s + 1] - 1
    grads: Tensor | None = None  # int64 [n_rows] gradient addresses
    order: Tensor | None = None  # int64 [n_blocks]: program ids, those of vector tensors first (``grad_table``)
    order_host: Tensor | None = None  # host copy of what ``order`` holds
    n_vector: int = 0  # programs at the head of ``order`` whose tensor (gradient included) is ALIGN-aligned
    parts: list[tuple[Tensor, bool]] = field(default_factory=list)  # the update's launches (slice of order, ALIGNED)
    grad_ptrs: tuple[int, ...] = ()  # host copy of what ``grads`` holds
    grad_refs: list[weakref.ref[Tensor]] = field(default_factory=list)  # the gradients ``grads`` points to
    segments: Tensor | None = None  # int64 [n_segments, n]: the folded update's segment table (``segment_table``)
    segment_rows: list[list[int]] = field(default_factory=list)  # host copy of what ``segments`` holds


def is_dense(t: Tensor) -> bool:
    """True when ``t``'s elements fill ``numel`` consecutive slots of memory (any dim order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same shape and same strides on every dim of size > 1 (so the same storage order)."""
    return a.shape == b.shape and all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1
    )


def _upload(host: Tensor, device: torch.device, out: Tensor | None = None) -> Tensor:
    """Copy a host tensor to ``device`` without a host-device sync (pinned + non_blocking)."""
    if device.type == "cpu":
        if out is None:
            return host
        out.copy_(host)
        return out
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fusedlr triton backend: the launch tables must be built before CUDA graph capture; "
            "run one eager optimizer step (with the same gradient tensors) before capturing"
        )
    pinned = host.pin_memory()
    # The pinned block is not reused by PyTorch's host allocator before this copy has completed.
    if out is None:
        out = torch.empty(host.shape, dtype=host.dtype, device=device)
    out.copy_(pinned, non_blocking=True)
    return out


def _moment_dtypes(p: Tensor) -> tuple[torch.dtype, ...]:
    """The moment dtypes the kernel can store for params like ``p``."""
    low = (torch.float32, torch.bfloat16)
    return (torch.float64, *low) if p.dtype == torch.float64 else low


def _masters(bucket: Bucket) -> list[Tensor] | None:
    """The bucket's fp32 masters or int16 remainders, or None."""
    prec = bucket.precision
    if prec is None:
        return None
    return prec.master if prec.master is not None else prec.remainder


def _eligible(bucket: Bucket) -> bool:
    """Params dense; moments (of one dtype the kernel stores) and masters dense in the param's layout,
    on the bucket's device."""
    device = bucket.device
    masters = _masters(bucket)
    moment_dtype = bucket.exp_avgs[0].dtype if bucket.exp_avgs else None
    for i, p in enumerate(bucket.params):
        states = [bucket.exp_avgs[i], bucket.exp_avg_sqs[i]]
        if bucket.max_exp_avg_sqs is not None:
            states.append(bucket.max_exp_avg_sqs[i])
        if p.device != device or not is_dense(p) or moment_dtype not in _moment_dtypes(p):
            return False
        for s in states:
            if s.dtype != moment_dtype or s.device != device or not _same_layout(s, p):
                return False
        if masters is not None and (masters[i].device != device or not _same_layout(masters[i], p)):
            return False
    return True


def bucket_tables(bucket: Bucket) -> LaunchTables | None:
    """The bucket's launch tables (built on first use and cached in ``bucket.cache``).

    None when the bucket cannot be addressed in storage order (see the module docstring).
    """
    if _CACHE_KEY in bucket.cache:
        return bucket.cache[_CACHE_KEY]  # type: ignore[return-value]
    tables = _build([bucket]) if addressable(bucket) else None
    bucket.cache[_CACHE_KEY] = tables
    return tables


def addressable(bucket: Bucket) -> bool:
    """Whether the kernels can address the bucket in storage order (see the module docstring; cached in
    ``bucket.cache``, builds no table)."""
    eligible = bucket.cache.get(_ELIGIBLE_KEY)
    if eligible is None:
        eligible = bucket.cache[_ELIGIBLE_KEY] = _eligible(bucket)
    return eligible  # type: ignore[return-value]


def set_tables(buckets: Sequence[Bucket]) -> LaunchTables | None:
    """The launch tables of several buckets of one device addressed as one launch (a launch set; the rows of
    bucket ``i`` in segment ``i``): ``bucket_tables`` for one bucket, else built on first use and cached in the
    first bucket's ``cache``. None when a bucket is not ``addressable``."""
    if len(buckets) == 1:
        return bucket_tables(buckets[0])
    if not all(addressable(b) for b in buckets):
        return None
    cache: dict[tuple[int, ...], tuple[tuple[Bucket, ...], LaunchTables]] = buckets[0].cache.setdefault(
        _SETS_KEY, {}
    )  # type: ignore[assignment]
    key = tuple(id(b) for b in buckets)
    hit = cache.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], buckets)):
        hit = cache[key] = (tuple(buckets), _build(buckets))
    return hit[1]


def _build(buckets: Sequence[Bucket]) -> LaunchTables:
    rows: list[list[int]] = []
    blocks: list[int] = []
    members: list[int] = []
    segment_first: list[int] = []
    bounds: list[int] = []
    flat = 0  # index of the bucket's first tensor in the set's params, concatenated
    for seg, bucket in enumerate(buckets):
        segment_first.append(len(blocks) if any(p.numel() for p in bucket.params) else -1)
        bounds.append(len(blocks))
        masters = _masters(bucket)
        for i, p in enumerate(bucket.params):
            n = p.numel()
            if n == 0:
                continue  # nothing to update; no program may be given to it
            vmax = bucket.max_exp_avg_sqs[i].data_ptr() if bucket.max_exp_avg_sqs is not None else 0
            master = masters[i].data_ptr() if masters is not None else 0
            n_prog = -(-n // CHUNK)
            rows.append(
                [p.data_ptr(), bucket.exp_avgs[i].data_ptr(), bucket.exp_avg_sqs[i].data_ptr(), vmax, n, i,
                 len(blocks), master, seg]
            )
            blocks.extend([len(rows) - 1] * n_prog)
            members.append(flat + i)
        flat += len(bucket.params)
    bounds.append(len(blocks))
    host_rows = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), ROW)
    addresses = [FIELD_P, FIELD_M, FIELD_V, FIELD_VMAX, FIELD_MASTER]
    host_blocks = torch.tensor(blocks, dtype=torch.int64)
    device = buckets[0].device
    return LaunchTables(
        rows=_upload(host_rows, device),
        blocks=_upload(host_blocks, device),
        members=members,
        n_blocks=len(blocks),
        partials=torch.zeros(2 * len(blocks), dtype=torch.float32, device=device),
        arrived=torch.zeros(1, dtype=torch.int32, device=device),
        update_arrived=torch.zeros(1, dtype=torch.int32, device=device),
        rows_aligned=(host_rows[:, addresses] % ALIGN == 0).all(dim=1),
        block_rows=host_blocks,
        segment_first=segment_first,
        segment_bounds=_upload(torch.tensor(bounds, dtype=torch.int64), device),
    )


def segment_table(tables: LaunchTables, rows: list[list[int]], device: torch.device) -> Tensor:
    """The device segment table holding ``rows`` (one int64 row per bucket of the set), uploaded only when
    they differ from what it holds."""
    if rows != tables.segment_rows or tables.segments is None:
        host = torch.tensor(rows, dtype=torch.int64)
        same_shape = tables.segments is not None and tables.segments.shape == host.shape
        tables.segments = _upload(host, device, tables.segments if same_shape else None)
        tables.segment_rows = rows
    return tables.segments


def _order(tables: LaunchTables, device: torch.device) -> None:
    """Refresh ``order``/``n_vector``/``parts`` (the update's split into a vectorized and a scalar launch) for the
    gradient addresses in ``grad_ptrs`` (called when they changed); uploads only when the order changed. The
    slices of ``parts`` are made here, so that a steady step dispatches no torch op (views included)."""
    vector = tables.rows_aligned & (torch.tensor(tables.grad_ptrs, dtype=torch.int64) % ALIGN == 0)
    per_block = vector[tables.block_rows]
    order = torch.cat([per_block.nonzero().flatten(), (~per_block).nonzero().flatten()])
    if tables.order_host is None or not torch.equal(order, tables.order_host):
        tables.order = _upload(order, device, tables.order)
        tables.order_host = order
    n_vector = tables.n_vector = int(per_block.sum())
    tables.parts = [(piece, aligned) for piece, aligned in ((tables.order[:n_vector], True),
                                                            (tables.order[n_vector:], False)) if piece.numel() > 0]


def grad_table(
    tables: LaunchTables, buckets: Sequence[Bucket], grads: Sequence[list[Tensor]]
) -> tuple[Tensor, list[Tensor]]:
    """The device table of gradient addresses for ``grads`` (one list per bucket of ``tables``, refreshed only
    when they moved).

    Returns the table and the gradient tensors it points to (copies in the param's layout for
    gradients of another layout), which the caller keeps alive until the launch is enqueued.
    Fast path (the common case): the same gradient tensors as last time, at the same addresses.
    """
    flat = grads[0] if len(grads) == 1 else [g for gs in grads for g in gs]
    members = tables.members
    last = tables.grad_refs
    if len(last) == len(members) and all(ref() is flat[i] for ref, i in zip(last, members)):
        used = [flat[i] for i in members]
        if tuple(g.data_ptr() for g in used) == tables.grad_ptrs:
            return tables.grads, used  # type: ignore[return-value]
    params = buckets[0].params if len(buckets) == 1 else [p for b in buckets for p in b.params]
    used: list[Tensor] = []
    direct = True
    for i in members:
        g, p = flat[i], params[i]
        if not _same_layout(g, p):
            g = torch.empty_like(p, dtype=g.dtype, memory_format=torch.preserve_format).copy_(g)
            direct = False
        used.append(g)
    ptrs = tuple(g.data_ptr() for g in used)
    device = buckets[0].device
    if ptrs != tables.grad_ptrs or tables.grads is None:
        host = torch.tensor(ptrs, dtype=torch.int64)
        tables.grads = _upload(host, device, tables.grads)
        tables.grad_ptrs = ptrs
        _order(tables, device)
    # Copies are fresh every call, so only gradients used in place can take the fast path.
    # Weak references: the cache must not keep a step's gradients alive after zero_grad().
    tables.grad_refs = [weakref.ref(g) for g in used] if direct else []
    return tables.grads, used
