"""A plain training loop that logs what fusedlr applied, without a host-device sync per step.

``history=LOG_EVERY`` keeps the last LOG_EVERY steps on the device; every LOG_EVERY steps one copy
(``read_history()``) brings them all to the host: the LR each update applied, the pre-clip gradient
norm, the clip coefficient and whether GradScaler skipped the step.

    python examples/plain_loop.py
"""

from __future__ import annotations

import torch

import fusedlr

LOG_EVERY = 25


def main(steps: int = 200) -> list[float]:
    """Train a small regression model for ``steps`` updates; returns the logged mean losses."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.randn(1024, 16, device=device)
    y = torch.sin(x @ torch.randn(16, 1, device=device))
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.LayerNorm(64), torch.nn.GELU(),
                                torch.nn.Linear(64, 1)).to(device)
    sched = fusedlr.get_schedule("cosine", num_warmup_steps=steps // 10, num_training_steps=steps)
    opt = fusedlr.AdamW(fusedlr.param_groups(model, weight_decay=0.1), lr=3e-3, schedule=sched, max_grad_norm=1.0,
                        history=LOG_EVERY)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    losses = torch.zeros(LOG_EVERY, device=device)  # kept on the device too
    logged = []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.mse_loss(model(x[idx]).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses[step % LOG_EVERY] = loss.detach()
        if (step + 1) % LOG_EVERY == 0:
            h = opt.read_history()  # one device-to-host copy for the last LOG_EVERY steps
            mean_loss = float(losses.mean())
            logged.append(mean_loss)
            print(f"steps {h.step[0]:4d}-{h.step[-1]:4d}  loss {mean_loss:.4f}  "
                  f"lr {h.lr[0][0]:.2e} -> {h.lr[-1][0]:.2e}  grad_norm max {max(h.grad_norm):.3f}  "
                  f"clipped {sum(c < 1.0 for c in h.clip_coef)}  skipped {sum(h.skipped)}")
    return logged


if __name__ == "__main__":
    main()
