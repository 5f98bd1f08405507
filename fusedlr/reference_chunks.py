"""How ``fusedlr.reference`` walks a bucket: chunks of whole tensors, and the math-dtype tensors each is updated
through (the stored tensors themselves, or views of one scratch buffer).

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

__all__ = ["CHUNK_NUMEL", "KEEP_SCRATCH", "Chunk", "Scratch", "make_chunk", "plan", "ranges", "shared_scratch"]

#: Elements per ``_foreach`` chunk of pass 2: bounds its temporaries to a few times this per bucket.
CHUNK_NUMEL = 1 << 24
#: Largest scratch (elements) a bucket keeps between steps (see ``shared_scratch``).
KEEP_SCRATCH = 1 << 22


def ranges(tensors: list[Tensor]) -> Iterator[list[int]]:
    """Consecutive index ranges of ``tensors`` holding about ``CHUNK_NUMEL`` elements each."""
    chunk: list[int] = []
    numel = 0
    for i, t in enumerate(tensors):
        chunk.append(i)
        numel += t.numel()
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
    """The scratch buffer every chunk of ``bucket`` reuses, with each chunk's memoized views: kept in
    ``bucket.cache`` between steps when it holds at most ``KEEP_SCRATCH`` elements (``key``: what the
    sequence of views depends on), else fresh."""
    cached = bucket.cache.get("fusedlr_reference_scratch")
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    buffer = torch.empty(numel, dtype=dtype, device=bucket.device)
    views: list[list[Tensor]] = []
    if numel <= KEEP_SCRATCH and not torch.compiler.is_compiling():
        bucket.cache["fusedlr_reference_scratch"] = (key, buffer, views)
    return buffer, views


@dataclass
class Chunk:
    """The math-dtype tensors a chunk of a bucket is updated through: each is the stored tensor itself
    (updated in place) or a scratch tensor, filled before the math from ``loads`` (scratch, source) and
    copied after it into ``stores`` (stored, result, rounding stream or None for nearest, param index).
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
    bucket: Bucket, grads: list[Tensor], idx: list[int], scratch: Scratch, scratch_grads: bool, private: bool,
    scale_into: bool,
) -> Chunk:
    """The tensors of chunk ``idx``. A stored tensor in the math dtype is used in place unless ``private``;
    gradients (never written) go through scratch when ``scratch_grads`` (another dtype, scaled or masked),
    written there by the scaling itself when ``scale_into``, else loaded first."""
    prec = bucket.precision
    dt = scratch.buffer.dtype
    loads: list[tuple[Tensor, Tensor]] = []
    stores: list[tuple[Tensor, Tensor, int | None, int]] = []

    def math(stored: list[Tensor], stream: int | None) -> list[Tensor]:
        out = []
        for i in idx:
            t = stored[i]
            if t.dtype != dt or private:
                s = scratch.take(t)
                loads.append((s, t))
                stores.append((t, s, stream, i))
                t = s
            out.append(t)
        return out

    g32 = [grads[i] for i in idx]
    scaled = g32 if scale_into else None
    if scratch_grads:
        g32 = [scratch.take(g) for g in g32]
        if not scale_into:
            loads += [(s, grads[i]) for s, i in zip(g32, idx)]
    if prec is not None and prec.master is not None:
        p32 = math(prec.master, Streams.PARAM)
        stores += [(bucket.params[i], p, None, i) for i, p in zip(idx, p32)]  # the param: its master, to nearest
    elif prec is not None and prec.remainder is not None:  # the master, joined from param and remainder
        p32 = [precision.join_master(bucket.params[i], prec.remainder[i]) for i in idx]
    else:
        p32 = math(bucket.params, Streams.PARAM)
    m32 = math(bucket.exp_avgs, Streams.EXP_AVG)
    v32 = math(bucket.exp_avg_sqs, Streams.EXP_AVG_SQ)
    vmax = bucket.max_exp_avg_sqs
    vmax32 = None if vmax is None else math(vmax, Streams.MAX_EXP_AVG_SQ)
    denom = [scratch.take(bucket.params[i]) for i in idx]
    return Chunk(idx, p32, g32, m32, v32, vmax32, denom, loads, stores, scaled)


def plan(
    bucket: Bucket, grads: list[Tensor], dt: torch.dtype, *, scratch_grads: bool, private: bool, scale_into: bool
) -> list[Chunk]:
    """Every chunk of ``bucket`` with its tensors in math dtype ``dt`` (see ``make_chunk`` for the flags), all
    allocated here. ``private``: each chunk gets fresh scratch of its own, every stored tensor included (its
    update is computed before the commit); else the chunks share one buffer of the largest chunk's size."""
    prec = bucket.precision
    stored = [bucket.exp_avgs, bucket.exp_avg_sqs, bucket.max_exp_avg_sqs]
    if prec is None or prec.remainder is None:
        stored.append(bucket.params if prec is None or prec.master is None else prec.master)
    per_element = 1 + int(scratch_grads) + sum(s is not None and (s[0].dtype != dt or private) for s in stored)
    idxs = list(ranges(bucket.params))
    sizes = [per_element * sum(bucket.params[i].numel() for i in idx) for idx in idxs]
    if private:
        return [
            make_chunk(bucket, grads, idx, Scratch(torch.empty(n, dtype=dt, device=bucket.device), []), scratch_grads,
                       True, scale_into)
            for idx, n in zip(idxs, sizes)
        ]
    buffer, views = shared_scratch(bucket, max(sizes, default=0), dt, (dt, scratch_grads, scale_into, tuple(sizes)))
    views += [[] for _ in idxs[len(views) :]]
    return [
        make_chunk(bucket, grads, idx, Scratch(buffer, chunk_views), scratch_grads, False, scale_into)
        for idx, chunk_views in zip(idxs, views)
    ]
