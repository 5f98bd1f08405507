"""bf16 training with fusedlr's precision modes against an fp32 baseline: a small GPT on a synthetic language.

The language is an order-2 Markov chain over 64 tokens, generated from a fixed seed: the next token
is drawn, half the time, from a peaked distribution given the previous token, and otherwise from one
given the token two back (which takes attention to learn); its entropy rate (the best achievable
loss) is known. Every
run starts from the same weights (the bf16 runs from them rounded to bf16) and sees the same batches
under a warmup + cosine LR schedule to zero, whose tail makes most updates smaller than half a bf16
ulp of the weights. Runs: fp32 params; bf16 params with fp32 moments rounded to nearest; stochastic
rounding; stochastic rounding with bf16 moments; fp32 master weights; 16-bit master remainders.

    python benchmarks/bf16_training.py --out benchmarks/results   # ~4 min on 2 CPU cores

Writes ``bf16-training-<date>.{json,md,png}``: the held-out loss curves, and per run the final
held-out loss, its gap to fp32, and the bytes per parameter of params + optimizer state.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor, nn

import fusedlr
from fusedlr import backends

VOCAB, SEQ, D, LAYERS, HEADS = 64, 64, 64, 2, 4

#: name -> (param dtype, fusedlr.AdamW keyword arguments)
RUNS: dict[str, tuple[torch.dtype, dict]] = {
    "fp32": (torch.float32, {}),
    "bf16 round-to-nearest": (torch.bfloat16, {}),
    "bf16 stochastic rounding": (torch.bfloat16, {"stochastic_rounding": True}),
    "bf16 SR + bf16 moments": (torch.bfloat16, {"stochastic_rounding": True, "state_dtype": torch.bfloat16}),
    "bf16 + fp32 master": (torch.bfloat16, {"master_weights": True}),
    "bf16 + master remainder": (torch.bfloat16, {"master_weights": "remainder"}),
}


def markov_language(seed: int = 0) -> Tensor:
    """``[VOCAB, VOCAB, VOCAB]`` next-token probabilities given the two previous tokens ``(a, b)``:
    ``(T1[b] + T2[a]) / 2`` with ``T1``, ``T2`` peaked random transition matrices."""
    g = torch.Generator().manual_seed(seed)
    t1, t2 = torch.softmax(torch.randn(2, VOCAB, VOCAB, generator=g, dtype=torch.float64) * 3.0, dim=-1)
    return (t1[None, :, :] + t2[:, None, :]) / 2


def entropy_rate(probs: Tensor) -> float:
    """The chain's conditional entropy per token in nats under its stationary pair distribution."""
    pair = torch.full((VOCAB * VOCAB,), 1.0 / VOCAB**2, dtype=torch.float64)
    trans = torch.zeros(VOCAB * VOCAB, VOCAB * VOCAB, dtype=torch.float64)
    for a in range(VOCAB):  # (a, b) -> (b, c) with probability probs[a, b, c]
        rows = trans[a * VOCAB : (a + 1) * VOCAB].view(VOCAB, VOCAB, VOCAB)
        rows[torch.arange(VOCAB), torch.arange(VOCAB)] = probs[a]
    for _ in range(200):
        pair = pair @ trans
    cond = -(probs * probs.log()).sum(-1).flatten()
    return float((pair * cond).sum())


def sample(probs: Tensor, n: int, seed: int) -> Tensor:
    """``n`` int64 sequences of ``SEQ + 1`` tokens from the chain."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, SEQ + 1, dtype=torch.int64)
    out[:, :2] = torch.randint(0, VOCAB, (n, 2), generator=g)
    for t in range(2, SEQ + 1):
        out[:, t] = torch.multinomial(probs[out[:, t - 2], out[:, t - 1]], 1, generator=g).squeeze(1)
    return out


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(SEQ, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln, self.head = nn.LayerNorm(D), nn.Linear(D, VOCAB)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        mask = torch.triu(torch.full((idx.shape[1],) * 2, -math.inf, dtype=x.dtype), 1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def loss_of(model: nn.Module, seqs: Tensor, compute: torch.dtype | None) -> Tensor:
    """Mean next-token cross-entropy; the forward runs in ``compute`` from the stored weights (autograd
    rounds the weight gradients back to the weights' dtype)."""
    weights = {name: p if compute is None else p.to(compute) for name, p in model.named_parameters()}
    logits = torch.func.functional_call(model, weights, (seqs[:, :-1],))
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), seqs[:, 1:].flatten())


def optimizer_bytes_per_param(opt: torch.optim.Optimizer, params: list[Tensor]) -> float:
    """Bytes of all optimizer state tensors except the step counters, per parameter."""
    total = sum(
        v.numel() * v.element_size()
        for p in params
        for k, v in opt.state[p].items()
        if isinstance(v, Tensor) and k != "step"
    )
    return total / sum(p.numel() for p in params)


def train(
    name: str, dtype: torch.dtype, kwargs: dict, args: argparse.Namespace, train_data: Tensor, eval_data: Tensor
) -> dict:
    torch.manual_seed(args.seed)
    model = TinyGPT().to(dtype)
    params = list(model.parameters())
    schedule = fusedlr.get_schedule("cosine", num_warmup_steps=args.steps // 20, num_training_steps=args.steps)
    opt = fusedlr.AdamW(
        params, lr=args.lr, weight_decay=0.01, schedule=schedule, max_grad_norm=1.0, seed=args.seed, **kwargs
    )
    curve: list[tuple[int, float]] = []
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                curve.append((step, float(loss_of(model, eval_data, args.compute))))
        if step == args.steps:
            break
        batch = train_data[(step * args.batch) % len(train_data) :][: args.batch]
        loss_of(model, batch, args.compute).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    param_bytes = params[0].element_size()
    state_bytes = optimizer_bytes_per_param(opt, params)
    print(f"{name:28s} final held-out loss {curve[-1][1]:.4f}  {seconds:.0f} s", flush=True)
    return {
        "name": name,
        "param_dtype": str(dtype).removeprefix("torch."),
        "options": {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v) for k, v in kwargs.items()},
        "curve": curve,
        "final_loss": curve[-1][1],
        "param_bytes_per_param": param_bytes,
        "optimizer_bytes_per_param": state_bytes,
        "seconds": seconds,
    }


def write_report(results: list[dict], meta: dict, out: Path, stem: str) -> None:
    base = results[0]["final_loss"]
    floor = meta["entropy_rate"]
    lines = [
        f"# bf16 training: fusedlr precision modes vs fp32 ({meta['date']})",
        "",
        f"{meta['model']}; {meta['data']}; {meta['schedule']}; {meta['compute']}; {meta['backend']}. "
        f"torch {meta['torch']}, {meta['device']}.",
        f"Best achievable loss (entropy rate of the language): {floor:.4f} nats.",
        "",
        "| run | final held-out loss | vs fp32 | excess over entropy vs fp32's | param B/param | optimizer B/param |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        excess = (r["final_loss"] - floor) / (base - floor)
        lines.append(
            f"| {r['name']} | {r['final_loss']:.4f} | {100 * (r['final_loss'] / base - 1):+.2f}% | {excess:.2f}x "
            f"| {r['param_bytes_per_param']} | {r['optimizer_bytes_per_param']:g} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        steps, losses = zip(*r["curve"])
        for ax in axes:
            ax.plot(steps, losses, label=r["name"], lw=1.4)
    tail = [loss for r in results for s, loss in r["curve"] if s >= meta["steps"] * 0.4]
    axes[1].set_xlim(meta["steps"] * 0.4, meta["steps"])
    axes[1].set_ylim(min(tail) - 0.01, max(tail) + 0.01)
    for ax, title in zip(axes, ("held-out loss", "last 60% of training (zoom)")):
        ax.axhline(floor, color="grey", ls=":", lw=1, label="entropy rate")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--compute", choices=["fp32", "native"], default="fp32",
                        help="forward/backward dtype: fp32 from the stored weights (default; the CPU has no fast bf16 "
                        "matmul), or the weights' own dtype")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compute_name = args.compute
    args.compute = torch.float32 if args.compute == "fp32" else None
    probs = markov_language(args.seed)
    train_data = sample(probs, args.steps * args.batch, seed=args.seed + 1)
    eval_data = sample(probs, 128, seed=args.seed + 2)
    results = [train(name, *RUNS[name], args, train_data, eval_data) for name in args.runs]
    date = datetime.date.today().isoformat()
    meta = {
        "date": date,
        "torch": torch.__version__,
        "device": f"CPU {platform.machine()} ({torch.get_num_threads()} threads)",
        "model": f"GPT, {LAYERS} layers, d {D}, {HEADS} heads, vocab {VOCAB}, context {SEQ} "
        f"({sum(p.numel() for p in TinyGPT().parameters())} params)",
        "data": f"order-2 Markov language, {args.steps} batches of {args.batch} fresh sequences, 128 held-out",
        "compute": "fp32 forward/backward from the stored weights; weight grads rounded to the weights' dtype"
        if compute_name == "fp32" else "forward/backward in the weights' dtype",
        "schedule": f"AdamW lr {args.lr:g} (warmup {args.steps // 20}, cosine to 0 at {args.steps}), wd 0.01, clip 1.0",
        "backend": f"fusedlr backend 'auto' = {backends.resolve('auto', torch.device('cpu')).NAME!r} "
        "(the precision modes run in the reference)",
        "steps": args.steps,
        "entropy_rate": entropy_rate(probs),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bf16-training-{date}"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    write_report(results, meta, args.out, stem)
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
