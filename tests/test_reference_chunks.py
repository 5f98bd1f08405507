"""The reference backend's chunking (fusedlr/reference_chunks.py): large tensors in flat pieces, the scratch a
bucket keeps between steps. Pieces change how the work is cut, never a result: every step must equal torch's
AdamW + clip_grad_norm_ + GradScaler, and bit for bit the same optimizer without pieces."""

from __future__ import annotations

import pytest
import torch

import fusedlr
from fusedlr import reference_chunks

SHAPES = [(0,), (1,), (7, 13), (1000,), (40, 30)]


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]
    params.append(torch.nn.Parameter(torch.randn(30, 40, dtype=dtype).t()))  # not contiguous: stays whole
    return params


def _grads(step: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(s, generator=gen).to(dtype) * 1024 for s in SHAPES]
    grads.append(torch.randn(30, 40, generator=gen).to(dtype).t() * 1024)
    if step == 2:
        grads[3][17] = float("inf")  # GradScaler skips this step
    return grads


def _run(opt_params: list[torch.nn.Parameter], opt, scaler: torch.amp.GradScaler, step: int, dtype) -> None:
    for p, g in zip(opt_params, _grads(step, dtype)):
        p.grad = g.clone()
    scaler.scale(torch.ones(()))
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_pieces_change_no_result(monkeypatch: pytest.MonkeyPatch, amsgrad: bool, dtype: torch.dtype) -> None:
    whole, pieces = _params(dtype), _params(dtype)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, amsgrad=amsgrad)
    opt_whole = fusedlr.AdamW(whole, max_grad_norm=1.0, backend="torch", **kw)
    opt_pieces = fusedlr.AdamW(pieces, max_grad_norm=1.0, backend="torch", **kw)
    torch_params = [torch.nn.Parameter(p.detach().clone().float()) for p in _params(dtype)]
    opt_torch = torch.optim.AdamW(torch_params, foreach=False, **kw)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(3)]
    for step in range(4):
        monkeypatch.setattr(reference_chunks, "CHUNK_NUMEL", 1 << 22)
        _run(whole, opt_whole, scalers[0], step, dtype)
        monkeypatch.setattr(reference_chunks, "CHUNK_NUMEL", 64)  # (1000,) and (40, 30) in pieces
        _run(pieces, opt_pieces, scalers[1], step, dtype)

        for p, g in zip(torch_params, _grads(step, dtype)):
            p.grad = g.float()
        scaler = scalers[2]
        scaler.scale(torch.ones(()))
        scaler.unscale_(opt_torch)
        torch.nn.utils.clip_grad_norm_(torch_params, 1.0)
        scaler.step(opt_torch)
        scaler.update()

        for a, b, t in zip(whole, pieces, torch_params):
            assert torch.equal(a, b), f"step {step}: pieces changed a result"
            assert torch.equal(opt_whole.state[a]["exp_avg"], opt_pieces.state[b]["exp_avg"])
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(a.float(), t.detach(), **tol)


def test_kept_scratch_is_bounded_by_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference_chunks, "CHUNK_NUMEL", 64)
    params = [torch.nn.Parameter(torch.randn(5000))]
    opt = fusedlr.AdamW(params, max_grad_norm=1.0, backend="torch")
    before = params[0].detach().clone()
    for _ in range(2):
        params[0].grad = torch.randn(5000)
        opt.step()
    (bucket,) = [b for _, b, _, _ in opt._step_cache["plan"].buckets]
    key, buffer, views = bucket.cache["fusedlr_reference_scratch"]
    assert buffer.numel() <= 2 * 64  # scaled grads + denominator, one piece at a time
    assert len(views) == 5000 // 64 + 1
    assert not torch.equal(params[0], before)

