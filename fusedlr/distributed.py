"""DTensor (FSDP2, tensor parallel) support: kernels update each rank's local shard, and the global
gradient norm sums each rank's partial sum of squares over the mesh dimensions the tensor is sharded on.

AdamW is elementwise, so updating local shards is exact; only the norm (and the non-finite count)
needs a collective: one ``all_reduce`` of a 2-element tensor per (mesh, sharded dims) class, issued
on the current stream, so a step still makes no host-device sync.
"""

from __future__ import annotations

from typing import Hashable

from torch import Tensor

__all__ = ["ReduceKey", "is_dtensor", "local", "reduce_key", "check_pair", "all_reduce_stats"]

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Replicate, Shard
except ImportError:  # torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]

#: (device mesh, mesh dimensions the tensor is sharded over); None for a plain tensor.
ReduceKey = tuple[Hashable, tuple[int, ...]]


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor the kernels read or write: a DTensor's local shard (same storage), else ``t``."""
    return t._local_tensor if is_dtensor(t) else t  # to_local() is this, minus autograd plumbing


def reduce_key(p: Tensor) -> ReduceKey | None:
    """How a parameter's partial sum of squares becomes global (None: it already is)."""
    if not is_dtensor(p):
        return None
    dims = tuple(i for i, placement in enumerate(p.placements) if isinstance(placement, Shard))
    return (p.device_mesh, dims) if dims else None


def check_pair(p: Tensor, g: Tensor) -> None:
    """A DTensor parameter needs a DTensor gradient on the same mesh with the same Shard/Replicate placements."""
    if is_dtensor(p) != is_dtensor(g):
        raise RuntimeError("fusedlr.AdamW: a DTensor parameter needs a DTensor gradient (and a plain one a plain one)")
    if not is_dtensor(p):
        return
    if p.device_mesh != g.device_mesh or p.placements != g.placements:
        raise RuntimeError(
            f"fusedlr.AdamW: gradient placements {g.placements} differ from the parameter's {p.placements}; "
            "redistribute the gradient to the parameter's placements first"
        )
    for placement in p.placements:
        if not isinstance(placement, (Shard, Replicate)):
            raise RuntimeError(f"fusedlr.AdamW supports Shard and Replicate DTensor placements, got {placement}")


def all_reduce_stats(stats: Tensor, key: ReduceKey) -> None:
    """Sum ``[sum of squares, non-finite count]`` over the mesh dimensions the bucket is sharded on."""
    mesh, dims = key
    for dim in dims:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
