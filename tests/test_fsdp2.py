"""FSDP2 (DTensor parameters) on two CPU ranks over gloo: fusedlr.AdamW against torch.optim.AdamW +
clip_grad_norm_ + LambdaLR on an identically sharded copy; the global norm must sum across ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

import fusedlr  # noqa: E402

WORLD = 2
STEPS = 6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _worker(rank: int, port: int, backend: str, max_norm: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh("cpu", (WORLD,))
        ours, ref = _shard(_model(), mesh), _shard(_model(), mesh)
        sched = fusedlr.get_schedule("linear", num_warmup_steps=2, num_training_steps=STEPS)
        opt = fusedlr.AdamW(ours.parameters(), lr=5e-2, schedule=sched, max_grad_norm=max_norm, backend=backend)
        topt = torch.optim.AdamW(ref.parameters(), lr=5e-2)
        tsched = torch.optim.lr_scheduler.LambdaLR(topt, sched)
        for i in range(STEPS):
            gen = torch.Generator().manual_seed(100 * i + rank)  # each rank its own batch
            x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
            for m, o in ((ours, opt), (ref, topt)):
                o.zero_grad()
                torch.nn.functional.mse_loss(m(x), y).mul(20.0).backward()
            opt.step()
            norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
            topt.step()
            tsched.step()
            torch.testing.assert_close(opt.grad_norm, norm.full_tensor(), rtol=1e-5, atol=0)
            for p, q in zip(ours.parameters(), ref.parameters()):
                assert isinstance(p, DTensor)
                torch.testing.assert_close(p.full_tensor(), q.full_tensor(), rtol=1e-5, atol=1e-6)
        p0 = next(ours.parameters())
        assert isinstance(opt.state[p0]["exp_avg"], DTensor)
        assert opt.state[p0]["exp_avg"].placements == p0.placements
        assert float(opt.grad_norm) > max_norm  # clipping was active, so the cross-rank sum mattered
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_fsdp2_matches_torch_with_global_clipping(backend: str) -> None:
    mp.spawn(_worker, args=(_free_port(), backend, 0.5), nprocs=WORLD, join=True)
