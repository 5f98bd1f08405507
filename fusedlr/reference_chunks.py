"""How ``fusedlr.reference`` walks a bucket: chunks of about ``CHUNK_NUMEL`` elements (whole tensors, or flat
pieces of a large contiguous one), and the math-dtype tensors each is updated through (the stored tensors
themselves, or views of one scratch buffer that the bucket keeps between steps).

Buffer management only; the math is in ``fusedlr.reference``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from . import precision
from .bucket import Bucket
from .precision import Streams

__all__ = ["CHUNK_NUMEL", "KEEP_SCRATCH", "Chunk", "Scratch", "Segment", "make_chunk", "plan", "ranges", "shared_scratch"]

#: Elements per ``_foreach`` chunk of pass 2: bounds the scratch a bucket keeps to a few times this.
CHUNK_NUMEL = 1 << 22

#: Largest scratch (elements) a bucket off the CPU keeps between steps (see ``shared_scratch``).
KEEP_SCRATCH = 1 << 20

#: Part of a bucket: parameter ``i``, whole (None) or the flat element range of a slice of it.
Segment = tuple[int, slice | None]


def _part(t: Tensor, piece: slice | None) -> Tensor:
    """``t``, or the flat piece of it (``t`` is contiguous when its piece is given, see ``ranges``)."""
    return t if piece is None else t.view(-1)[piece]


def _splittable(bucket: Bucket, i: int) -> bool:
    """Whether parameter ``i`` and every state tensor written with it are contiguous (flat views of them are
    then their elements in one order)."""
    tensors = [bucket.params[i], bucket.exp_avgs[i], bucket.exp_avg_sqs[i]]
    if bucket.max_exp_avg_sqs is not None:
        tensors.append(bucket.max_exp_avg_sqs[i])
    if bucket.precision is not None and bucket.precision.master is not None:
        tensors.append(bucket.precision.master[i])
    return all(t.is_contiguous() for t in tensors)


def ranges(bucket: Bucket, split: bool) -> Iterator[list[Segment]]:
    """Consecutive segments of the bucket's parameters holding about ``CHUNK_NUMEL`` elements each; with
    ``split``, a contiguous parameter larger than that comes in flat pieces of ``CHUNK_NUMEL``."""
    chunk: list[Segment] = []
    numel = 0
    for i, p in enumerate(bucket.params):
        n = p.numel()
        pieces: list[slice | None] = [None]
        if split and n > CHUNK_NUMEL and _splittable(bucket, i):
            pieces = [slice(lo, min(lo + CHUNK_NUMEL, n)) for lo in range(0, n, CHUNK_NUMEL)]
        for piece in pieces:
            chunk.append((i, piece))
            numel += n if piece is None else piece.stop - piece.start
            if numel >= CHUNK_NUMEL:
                yield chunk
                chunk, numel = [], 0
    if chunk:
        yield chunk


class Scratch:
    """Hands out math-dtype tensors carved in order out of ``buffer`` (allocated beforehand).

    ``views`` memoizes them: the same sequence of ``take`` calls over the same buffer gets the same views,
    made once (a view costs microseconds, which dominates a step over many small tensors).
    """

    def __init__(self, buffer: Tensor, views: list[Tensor]) -> None:
        self.buffer = buffer
        self.views = views
        self.used = 0
        self.taken = 0

    def take(self, like: Tensor) -> Tensor:
        n = like.numel()
        if self.taken == len(self.views):
            self.views.append(self.buffer[self.used : self.used + n].view(like.shape))
        self.used += n
        self.taken += 1
        return self.views[self.taken - 1]


def shared_scratch(bucket: Bucket, numel: int, dtype: torch.dtype, key: tuple) -> tuple[Tensor, list[list[Tensor]]]:
    """The scratch buffer every chunk of ``bucket`` reuses, with each chunk's memoized views, kept in
    ``bucket.cache`` between steps (``key``: what the sequence of views depends on): on the CPU, where
    allocating it each step is as slow as the update itself (page-faulted in), and elsewhere when it holds at
    most ``KEEP_SCRATCH`` elements (a GPU's caching allocator makes a large one cheap, and free between steps
    for other tensors)."""
    cached = bucket.cache.get("fusedlr_reference_scratch")
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    buffer = torch.empty(numel, dtype=dtype, device=bucket.device)
    views: list[list[Tensor]] = []
    if (bucket.device.type == "cpu" or numel <= KEEP_SCRATCH) and not torch.compiler.is_compiling():
        bucket.cache["fusedlr_reference_scratch"] = (key, buffer, views)
    return buffer, views


@dataclass
class Chunk:
    """The math-dtype tensors a chunk of a bucket is updated through: each is the stored tensor itself
    (updated in place) or a scratch tensor, filled before the math from ``loads`` (scratch, source) and
    copied after it into ``stores`` (stored, result, rounding stream or None for nearest, param index).
    ``idx``: the parameter of each entry (a parameter in pieces appears once per piece).
    ``scaled``: the gradients ``g32`` receives scaled (one pass each), when not among ``loads``."""

    idx: list[int]
    p32: list[Tensor]
    g32: list[Tensor]
    m32: list[Tensor]
    v32: list[Tensor]
    vmax32: list[Tensor] | None
    denom: list[Tensor]
    loads: list[tuple[Tensor, Tensor]]
    stores: list[tuple[Tensor, Tensor, int | None, int]]
    scaled: list[Tensor] | None


def make_chunk(
    bucket: Bucket, grads: list[Tensor], segments: list[Segment], scratch: Scratch, scratch_grads: bool,
    private: bool, scale_into: bool,
) -> Chunk:
    """The tensors of a chunk. A stored tensor in the math dtype is used in place unless ``private``;
    gradients (never written) go through scratch when ``scratch_grads`` (another dtype, scaled or masked),
    written there by the scaling itself when ``scale_into``, else loaded first."""
    prec = bucket.precision
    dt = scratch.buffer.dtype
    idx = [i for i, _ in segments]
    loads: list[tuple[Tensor, Tensor]] = []
    stores: list[tuple[Tensor, Tensor, int | None, int]] = []

    def math(stored: list[Tensor], stream: int | None) -> list[Tensor]:
        out = []
        for i, piece in segments:
            t = _part(stored[i], piece)
            if t.dtype != dt or private:
                s = scratch.take(t)
                loads.append((s, t))
                stores.append((t, s, stream, i))
                t = s
            out.append(t)
        return out

    g32 = [grads[i] if piece is None else grads[i].reshape(-1)[piece] for i, piece in segments]
    scaled = g32 if scale_into else None
    if scratch_grads:
        sources = g32
        g32 = [scratch.take(g) for g in sources]
        if not scale_into:
            loads += list(zip(g32, sources))
    if prec is not None and prec.master is not None:
        p32 = math(prec.master, Streams.PARAM)
        stores += [  # the param: its master, to nearest
            (_part(bucket.params[i], piece), p, None, i) for (i, piece), p in zip(segments, p32)
        ]
    elif prec is not None and prec.remainder is not None:  # the master, joined from param and remainder
        p32 = [precision.join_master(bucket.params[i], prec.remainder[i]) for i in idx]
    else:
        p32 = math(bucket.params, Streams.PARAM)
    m32 = math(bucket.exp_avgs, Streams.EXP_AVG)
    v32 = math(bucket.exp_avg_sqs, Streams.EXP_AVG_SQ)
    vmax = bucket.max_exp_avg_sqs
    vmax32 = None if vmax is None else math(vmax, Streams.MAX_EXP_AVG_SQ)
    denom = [scratch.take(p) for p in p32]
    return Chunk(idx, p32, g32, m32, v32, vmax32, denom, loads, stores, scaled)


def _numel(bucket: Bucket, segment: Segment) -> int:
    i, piece = segment
    return bucket.params[i].numel() if piece is None else piece.stop - piece.start


def plan(
    bucket: Bucket, grads: list[Tensor], dt: torch.dtype, *, scratch_grads: bool, private: bool, scale_into: bool
) -> list[Chunk]:
    """Every chunk of ``bucket`` with its tensors in math dtype ``dt`` (see ``make_chunk`` for the flags), all
    allocated here. ``private``: each chunk gets fresh scratch of its own, every stored tensor included (its
    update is computed before the commit; whole tensors, as the stochastic rounding's element offsets are
    theirs); else the chunks share one buffer of the largest chunk's size, kept by the bucket."""
    prec = bucket.precision
    stored = [bucket.exp_avgs, bucket.exp_avg_sqs, bucket.max_exp_avg_sqs]
    if prec is None or prec.remainder is None:
        stored.append(bucket.params if prec is None or prec.master is None else prec.master)
    per_element = 1 + int(scratch_grads) + sum(s is not None and (s[0].dtype != dt or private) for s in stored)
    chunks = list(ranges(bucket, split=not private))
    sizes = [per_element * sum(_numel(bucket, segment) for segment in chunk) for chunk in chunks]
    if private:
        return [
            make_chunk(bucket, grads, chunk, Scratch(torch.empty(n, dtype=dt, device=bucket.device), []),
                       scratch_grads, True, scale_into)
            for chunk, n in zip(chunks, sizes)
        ]
    buffer, views = shared_scratch(bucket, max(sizes, default=0), dt, (dt, scratch_grads, scale_into, tuple(sizes)))
    views += [[] for _ in chunks[len(views) :]]
    return [
        make_chunk(bucket, grads, chunk, Scratch(buffer, chunk_views), scratch_grads, False, scale_into)
        for chunk, chunk_views in zip(chunks, views)
    ]
