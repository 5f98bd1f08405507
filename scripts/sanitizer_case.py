"""A small CUDA case for compute-sanitizer (memcheck, racecheck): a few steps of the CUDA and Triton
backends over odd sizes, an empty tensor, a misaligned view, AMP with a skipped step and clipping.

    compute-sanitizer --tool memcheck python scripts/sanitizer_case.py
"""

from __future__ import annotations

import torch

import fusedlr


def main() -> None:
    torch.manual_seed(0)
    for backend in ("cuda", "triton"):
        for dtype in (torch.float32, torch.bfloat16):
            base = torch.randn(8192 * 2 + 7, device="cuda", dtype=dtype)
            params = [torch.nn.Parameter(t) for t in (torch.randn(5, 3, device="cuda", dtype=dtype),
                                                      torch.zeros(0, device="cuda", dtype=dtype),
                                                      torch.randn(4097, device="cuda", dtype=dtype))]
            params.append(torch.nn.Parameter(base[1:]))  # storage offset 1: the unaligned path
            sched = fusedlr.get_schedule("cosine", num_warmup_steps=1, num_training_steps=10)
            opt = fusedlr.AdamW(params, lr=1e-2, amsgrad=True, max_grad_norm=1.0, schedule=sched, backend=backend)
            scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
            for step in range(3):
                for p in params:
                    p.grad = torch.randn_like(p)
                if step == 1:
                    params[0].grad[0, 0] = float("inf")
                scaler.step(opt)
                scaler.update()
        torch.cuda.synchronize()
        print(f"{backend}: ok")


if __name__ == "__main__":
    main()
