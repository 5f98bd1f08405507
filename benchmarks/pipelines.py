"""The optimizer-step pipelines under test, built over one case's parameters and preallocated grads.

torch pipelines (what a PyTorch user runs today), one step::

    scaler.unscale_(opt); clip_grad_norm_(params, 1.0, foreach=True); scaler.step(opt); scaler.update(); lr_sched.step()

with ``opt = torch.optim.AdamW(foreach=True)`` or ``(fused=True)`` (states in the param dtype) and ``lr_sched`` a
``LambdaLR`` with Hugging Face's warmup-cosine lambda. fusedlr pipelines, one step::

    amp:   scaler.step(opt); scaler.update()      # opt = fusedlr.AdamW(..., schedule=, max_grad_norm=1.0)
    noamp: opt.step()                            # no GradScaler: grads stay scaled, clipping normalises them
    graph: CUDA-graph replay of the noamp step   # GradScaler.step/update cannot be captured

Grads are preallocated once per case (``cases.make_grads``) and re-assigned before every step by ``prepare``
(untimed); torch pipelines unscale and clip them in place, so ``prepare`` first restores their private copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import fusedlr
from fusedlr import backends

from .cases import Case, decay_split, make_params, refill_params_

__all__ = [
    "BENCH_HYPER",
    "REFERENCE",
    "Hyper",
    "Pipeline",
    "PipelineSpec",
    "build_pipeline",
    "check_hyper",
    "pipeline_specs",
    "torch_lr_lambda",
]


@dataclass(frozen=True)
class Hyper:
    """Hyperparameters of every pipeline of a run (schedule: warmup-cosine to 0 over ``total`` updates)."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    warmup: int = 100
    total: int = 100_000
    init_scale: float = 2.0**16

    def schedule(self) -> fusedlr.Schedule:
        """fusedlr's schedule for these hyperparameters."""
        return fusedlr.get_schedule("cosine", num_warmup_steps=self.warmup, num_training_steps=self.total)


#: Timed runs: a tiny LR, so re-applying the same grads for hundreds of steps moves params by < 1e-2.
BENCH_HYPER = Hyper()


def check_hyper(case: Case) -> Hyper:
    """Hyperparameters of the agreement check: an LR large enough to be visible in bf16, an eps about a third
    of a clipped gradient element (so unscaling/clipping errors change the update: Adam alone is scale
    invariant) and a schedule that warms up and decays within the few checked steps."""
    return Hyper(lr=1e-2, eps=0.3 / math.sqrt(case.num_params), warmup=2, total=10)


def torch_lr_lambda(hyper: Hyper) -> Callable[[int], float]:
    """Hugging Face's ``get_cosine_schedule_with_warmup`` multiplier (pure Python, as users run it)."""
    warmup, total = hyper.warmup, hyper.total

    def multiplier(k: int) -> float:
        if k < warmup:
            return float(k) / float(max(1, warmup))
        progress = float(k - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    return multiplier


@dataclass(frozen=True)
class PipelineSpec:
    """Which pipeline: ``family`` "torch" (``impl`` "foreach"/"fused") or "fusedlr" (``impl`` a backend name);
    ``mode`` "amp" (GradScaler), "noamp" (eager, no GradScaler) or "graph" (CUDA-graph replay of noamp)."""

    family: str
    impl: str
    mode: str = "amp"

    @property
    def name(self) -> str:
        base = f"{self.family}-{self.impl}"
        return base if self.mode == "amp" else f"{base}-{self.mode}"

    @property
    def description(self) -> str:
        if self.family == "torch":
            return (f"torch.optim.AdamW({self.impl}=True) + GradScaler.unscale_ + clip_grad_norm_(foreach=True)"
                    " + scaler.step/update + LambdaLR.step")
        return {
            "amp": f"fusedlr.AdamW(backend={self.impl!r}): scaler.step(opt); scaler.update()",
            "noamp": f"fusedlr.AdamW(backend={self.impl!r}).step(), eager, no GradScaler",
            "graph": f"fusedlr.AdamW(backend={self.impl!r}).step() captured in a CUDA graph, replayed; no GradScaler",
        }[self.mode]


#: The spec every other pipeline is checked against: fusedlr's pure-PyTorch reference, with a GradScaler.
REFERENCE = PipelineSpec("fusedlr", "torch", "amp")


def pipeline_specs(device: torch.device) -> list[tuple[PipelineSpec, str | None]]:
    """Every pipeline for ``device`` with the reason it cannot run there (None: it can).

    Order: the AMP pipelines (torch's two, then each fusedlr backend), then per backend eager vs graph (CUDA)."""
    specs: list[tuple[PipelineSpec, str | None]] = [
        (PipelineSpec("torch", "foreach"), None),
        (PipelineSpec("torch", "fused"), None),
    ]
    other = "cpu" if device.type == "cuda" else "cuda"
    status = {b: s for b, s in backends.describe(device).items() if b != other}
    for b, s in status.items():
        specs.append((PipelineSpec("fusedlr", b), None if s == "ok" else s))
    if device.type == "cuda":
        for b, s in status.items():
            for mode in ("noamp", "graph"):
                specs.append((PipelineSpec("fusedlr", b, mode), None if s == "ok" else s))
    return specs


@dataclass
class Pipeline:
    """A built pipeline. ``step`` is the timed region, ``prepare`` (untimed) re-assigns the grads before it."""

    spec: PipelineSpec
    params: list[Tensor]
    step: Callable[[], object]
    prepare: Callable[[], object]
    grad_norm: Callable[[], float]
    state_dtype: torch.dtype
    keep: list[object] = field(default_factory=list)


def build_pipeline(spec: PipelineSpec, case: Case, device: torch.device, hyper: Hyper, grads: list[Tensor]) -> Pipeline:
    """Fresh parameters of ``case`` (seed 0) and a pipeline that steps them with ``grads`` (read, never written)."""
    params = make_params(case, device)
    if spec.family == "torch":
        return _build_torch(spec, case, params, device, hyper, grads)
    return _build_fusedlr(spec, case, params, device, hyper, grads)


def _assign(params: list[Tensor], grads: list[Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g


def _scaler(device: torch.device, hyper: Hyper) -> torch.amp.GradScaler:
    """A GradScaler whose scale exists (``scaler.scale(loss)`` creates it lazily; no loss here)."""
    scaler = torch.amp.GradScaler(device.type, init_scale=hyper.init_scale)
    scaler.scale(torch.zeros((), device=device))
    return scaler


def _groups(case: Case, params: list[Tensor]) -> list[dict[str, object]]:
    """``params`` in ``case``'s param groups (``decay_split``): the second group, if any, without weight decay."""
    split = decay_split(case)
    return [
        {"params": [params[i] for i in idx], **({"weight_decay": 0.0} if gi else {})} for gi, idx in enumerate(split)
    ]


def _build_torch(spec: PipelineSpec, case: Case, params: list[Tensor], device: torch.device, hyper: Hyper,
                 grads: list[Tensor]) -> Pipeline:
    work = [g.clone() for g in grads]
    _assign(params, work)
    flag = {"foreach": {"foreach": True}, "fused": {"fused": True}}[spec.impl]
    opt = torch.optim.AdamW(_groups(case, params), lr=hyper.lr, betas=hyper.betas, eps=hyper.eps,
                            weight_decay=hyper.weight_decay, **flag)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, torch_lr_lambda(hyper))
    scaler = _scaler(device, hyper)
    norm: list[Tensor] = []

    def prepare() -> None:
        torch._foreach_copy_(work, grads)
        _assign(params, work)

    def step() -> None:
        scaler.unscale_(opt)
        norm[:] = [torch.nn.utils.clip_grad_norm_(params, hyper.max_grad_norm, foreach=True)]
        scaler.step(opt)
        scaler.update()
        lr_sched.step()

    return Pipeline(spec, params, step, prepare, lambda: float(norm[0]), params[0].dtype, [opt, lr_sched, scaler, work])


def _capture(step: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Warm ``step`` up on a side stream, then capture one call of it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


@torch.no_grad()
def _reset(opt: fusedlr.AdamW, params: list[Tensor], case: Case) -> None:
    """Back to fresh params and zero state, in place (the graph keeps pointing at the same tensors)."""
    refill_params_(params, case)
    for p in params:
        state = opt.state[p]
        for key in ("step", "exp_avg", "exp_avg_sq", "master_remainder"):
            if key in state:
                state[key].zero_()
        if "master_param" in state:
            state["master_param"].copy_(p)
    index = opt.schedule_index
    if index is not None:
        index.zero_()


def _build_fusedlr(spec: PipelineSpec, case: Case, params: list[Tensor], device: torch.device, hyper: Hyper,
                   grads: list[Tensor]) -> Pipeline:
    _assign(params, grads)
    opt = fusedlr.AdamW(_groups(case, params), lr=hyper.lr, betas=hyper.betas, eps=hyper.eps,
                        weight_decay=hyper.weight_decay,
                        schedule=hyper.schedule(), max_grad_norm=hyper.max_grad_norm, backend=spec.impl,
                        **case.options)  # type: ignore[arg-type]
    keep: list[object] = [opt]
    norm_scale = 1.0
    step: Callable[[], object] = opt.step
    if spec.mode == "amp":
        scaler = _scaler(device, hyper)
        keep.append(scaler)

        def amp_step() -> None:
            scaler.step(opt)
            scaler.update()

        step = amp_step
    else:
        norm_scale = 1.0 / hyper.init_scale  # the grads were never unscaled
        if spec.mode == "graph":
            if device.type != "cuda":
                raise RuntimeError("CUDA graphs need a CUDA device")
            graph = _capture(opt.step)
            _reset(opt, params, case)
            keep.append(graph)
            step = graph.replay

    def grad_norm() -> float:
        assert opt.grad_norm is not None
        return float(opt.grad_norm) * norm_scale

    def prepare() -> None:
        _assign(params, grads)

    return Pipeline(spec, params, step, prepare, grad_norm, torch.float32, keep)
