"""Command line: ``python -m fusedlr {demo,plot,lr-find,info}``.

A user mistake (a bad argument, a schedule argument out of range) ends in one line on stderr naming
the argument and the fix, exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Callable, Sequence

import torch

from . import backends
from .lr_find import lr_find
from .optimizer import AdamW
from .param_groups import param_groups
from .schedules import SCHEDULE_NAMES, get_schedule

__all__ = ["main"]


def _number(text: str) -> object:
    """An int, a float, or the text itself."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _schedule_kwargs(pairs: Sequence[str]) -> dict[str, object]:
    """``key=value`` pairs: JSON values (numbers, lists, booleans), ``a,b,c`` lists, else strings."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--arg expects key=value (e.g. --arg milestones=100,500), got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = [_number(v) for v in value.split(",")] if "," in value else value
    return out


def _typed(check: Callable[[float], bool], parse: Callable[[str], float], what: str) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    convert.__name__ = what
    return convert


_positive_float = _typed(lambda v: 0.0 < v < math.inf, float, "a positive number")
_positive_int = _typed(lambda v: v > 0, int, "a positive int")
_nonneg_int = _typed(lambda v: v >= 0, int, "a non-negative int")


def plot(args: argparse.Namespace) -> None:
    """Draw ``lr * sched(k)`` for k in [0, total) to a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit("plotting needs matplotlib: pip install 'fusedlr[plot]'") from err
    extra = _schedule_kwargs(args.arg)
    sched = get_schedule(args.schedule, args.warmup, args.total, **extra)
    if sched.absolute and args.lr is None:
        raise ValueError(f"{args.schedule} with an absolute LR (lr_end/min_lr) needs --lr, the peak LR it is relative to")
    if args.lr is not None:
        sched = sched.bind(args.lr)
    ks = torch.arange(args.total)
    lrs = ((1.0 if args.lr is None else args.lr) * sched(ks)).numpy()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(ks.numpy(), lrs)
    ax.set_xlabel("update index k (first update: k=0)")
    ax.set_ylabel("LR multiplier sched(k)" if args.lr is None else "learning rate lr * sched(k)")
    shown = [f"warmup={args.warmup}", f"total={args.total}"] + ([] if args.lr is None else [f"lr={args.lr:g}"])
    shown += [f"{key}={value}" for key, value in extra.items()]
    ax.set_title(f"{args.schedule}: {', '.join(shown)}", fontsize=9)
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
    opt = AdamW(param_groups(model, weight_decay=0.01), lr=3e-3, schedule=sched, max_grad_norm=1.0,
                backend=args.backend, history=args.log_every)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    print(f"device {device}, backend {opt.backend} -> {opt.resolved_backend}, amp={use_amp}")
    for k in range(args.steps):
        idx = torch.randint(0, x.shape[0], (128,), device=device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if k % args.log_every == 0 or k == args.steps - 1:
            last = opt.read_history()  # one copy for the steps since the last log
            print(f"step {k:4d}  loss {loss.item():.4f}  lr {last.lr[-1][0]:.2e}  grad_norm {last.grad_norm[-1]:.3f}"
                  f"  clipped {sum(c < 1.0 for c in last.clip_coef)}/{len(last)}  skipped {sum(last.skipped)}")

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


def find_lr(args: argparse.Namespace) -> None:
    """The LR range test on the demo model."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, x, y = _toy_problem(device)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, x.shape[0], (128,), generator=gen).to(device) for _ in range(16)]
    result = lr_find(
        model, lambda m, idx: torch.nn.functional.mse_loss(m(x[idx]), y[idx]), batches,
        start_lr=args.start_lr, end_lr=args.end_lr, num_iter=args.num_iter, backend=args.backend,
    )
    end = "stopped early: the loss diverged" if result.diverged else "ran to end_lr"
    print(f"{len(result.lrs)} updates, lr {result.lrs[0]:.2e} .. {result.lrs[-1]:.2e} ({end})")
    print(f"suggested lr {result.suggested_lr:.2e}" if result.suggested_lr else "no suggestion (too few points)")
    if args.out:
        try:
            result.plot(args.out)
        except ImportError as err:
            raise SystemExit("plotting needs matplotlib: pip install 'fusedlr[plot]' (or pass --out '')") from err
        print(f"wrote {args.out}")


def info(args: argparse.Namespace) -> None:
    """Which backends can run here."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"torch {torch.__version__}, device {device}")
    for name, status in backends.describe(device).items():
        print(f"  {name:7s} {status}")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    parser = _Parser(prog="python -m fusedlr")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plot", help="draw an LR schedule to a PNG")
    p.add_argument("--schedule", required=True, choices=SCHEDULE_NAMES)
    p.add_argument("--warmup", type=_nonneg_int, default=0, help="num_warmup_steps")
    p.add_argument("--total", type=_positive_int, required=True, help="num_training_steps (number of updates)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="peak LR (the group's lr): plot the LR instead of the multiplier")
    p.add_argument("--arg", action="append", default=[],
                   help="extra schedule argument key=value, repeatable; lists as 100,500")
    p.add_argument("--out", default="lr.png")
    p.set_defaults(func=plot)
    d = sub.add_parser("demo", help="train a small model with fusedlr.AdamW")
    d.add_argument("--steps", type=_positive_int, default=300)
    d.add_argument("--log-every", type=_positive_int, default=50)
    d.add_argument("--device", default=None)
    d.add_argument("--backend", default="auto", choices=backends.BACKENDS)
    d.set_defaults(func=demo)
    f = sub.add_parser("lr-find", help="LR range test on the demo model (suggests a peak LR)")
    f.add_argument("--start-lr", type=_positive_float, default=1e-7)
    f.add_argument("--end-lr", type=_positive_float, default=10.0)
    f.add_argument("--num-iter", type=_positive_int, default=100)
    f.add_argument("--device", default=None)
    f.add_argument("--backend", default="auto", choices=backends.BACKENDS)
    f.add_argument("--out", default="lr_find.png", help="plot path ('' for none)")
    f.set_defaults(func=find_lr)
    i = sub.add_parser("info", help="list the backends usable on this machine")
    i.add_argument("--device", default=None)
    i.set_defaults(func=info)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, RuntimeError) as err:  # user mistakes: every check raises these with the fix
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
