"""Command line: ``python -m fusedlr {demo,plot,info}``."""

from __future__ import annotations

import argparse
import json
import time
from typing import Sequence

import torch

from . import backends
from .optimizer import AdamW
from .schedules import SCHEDULE_NAMES, get_schedule

__all__ = ["main"]


def _schedule_kwargs(pairs: Sequence[str]) -> dict[str, object]:
    """``key=value`` pairs, values parsed as JSON when they parse (numbers, lists, booleans)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--arg expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def plot(args: argparse.Namespace) -> None:
    """Draw ``lr * sched(k)`` for k in [0, total) to a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit("plotting needs matplotlib: pip install 'fusedlr[plot]'") from err
    sched = get_schedule(args.schedule, args.warmup, args.total, **_schedule_kwargs(args.arg))
    ks = torch.arange(args.total)
    lrs = (args.lr * sched(ks)).numpy()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(ks.numpy(), lrs)
    ax.set_xlabel("update index k (first update: k=0)")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{args.schedule}: warmup {args.warmup}, total {args.total}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}: lr(0)={lrs[0]:.3g}, max={lrs.max():.3g} at k={int(lrs.argmax())}, lr(last)={lrs[-1]:.3g}")


def _toy_problem(device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=gen)
    w = torch.randn(32, 8, generator=gen)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(2048, 8, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                                torch.nn.GELU(), torch.nn.Linear(256, 8))
    return model.to(device), x.to(device), y.to(device)


def _time_steps(step: "callable[[], object]", device: torch.device, n: int) -> float:
    """Median seconds of ``step`` over n calls (CUDA-synchronised around each call on a GPU)."""
    times = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def demo(args: argparse.Namespace) -> None:
    """Train a small MLP with fusedlr.AdamW + warmup-cosine + clipping (+ AMP on a GPU)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, x, y = _toy_problem(device)
    sched = get_schedule("cosine", num_warmup_steps=args.steps // 10, num_training_steps=args.steps)
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, schedule=sched, max_grad_norm=1.0,
                backend=args.backend)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    print(f"device {device}, backend {opt.backend} -> {backends.resolve(opt.backend, device).NAME}, amp={use_amp}")
    for k in range(args.steps):
        idx = torch.randint(0, x.shape[0], (128,), device=device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        lr = opt.scheduled_lr()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if k % args.log_every == 0 or k == args.steps - 1:
            print(f"step {k:4d}  loss {loss.item():.4f}  lr {lr.item():.2e}  grad_norm {opt.grad_norm.item():.3f}")

    grads = [p.grad for p in model.parameters()]
    ref = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=device.type == "cuda")
    def torch_step() -> None:
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        ref.step()
    ours_s = _time_steps(lambda: opt.step(), device, 30)
    torch_s = _time_steps(torch_step, device, 30)
    print(f"optimizer step (clip + schedule + AdamW, {sum(p.numel() for p in model.parameters())} params): "
          f"fusedlr {ours_s * 1e6:.0f} us, torch clip_grad_norm_ + AdamW {torch_s * 1e6:.0f} us "
          f"(ratio {torch_s / ours_s:.2f}x; a toy model, see benchmarks/ for real cases)")


def info(args: argparse.Namespace) -> None:
    """Which backends can run here."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"torch {torch.__version__}, device {device}")
    for name, status in backends.describe(device).items():
        print(f"  {name:7s} {status}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fusedlr")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plot", help="draw an LR schedule to a PNG")
    p.add_argument("--schedule", required=True, choices=SCHEDULE_NAMES)
    p.add_argument("--warmup", type=int, default=0, help="num_warmup_steps")
    p.add_argument("--total", type=int, required=True, help="num_training_steps (number of updates)")
    p.add_argument("--lr", type=float, default=1.0, help="peak LR (the group's lr)")
    p.add_argument("--arg", action="append", default=[], help="extra schedule argument key=value (repeatable)")
    p.add_argument("--out", default="lr.png")
    p.set_defaults(func=plot)
    d = sub.add_parser("demo", help="train a small model with fusedlr.AdamW")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--log-every", type=int, default=50)
    d.add_argument("--device", default=None)
    d.add_argument("--backend", default="auto", choices=backends.BACKENDS)
    d.set_defaults(func=demo)
    i = sub.add_parser("info", help="list the backends usable on this machine")
    i.add_argument("--device", default=None)
    i.set_defaults(func=info)
    args = parser.parse_args(argv)
    args.func(args)
