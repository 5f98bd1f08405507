"""Benchmark cases: parameter shape sets x parameter dtype, their deterministic tensors and byte model.

Bytes model (what one fused fusedlr step must move, per parameter; default mode: float32 states)::

    reduction pass (global norm + inf check): read grad                       = g
    update pass: read param + grad + exp_avg + exp_avg_sq                     = p + g + 4 + 4
                 write param + exp_avg + exp_avg_sq                           = p + 4 + 4
    fp32 params/grads (p = g = 4): 4 + (4+4+4+4) + (4+4+4) = 32 bytes
    bf16 params/grads (p = g = 2): 2 + (2+2+4+4) + (2+4+4) = 24 bytes

Precision modes (``MODES``, bf16 cases named ``<shapes>-bf16-<mode>``) change what is moved and kept,
with s the moment size (4, or 2 for bf16 moments) and c the master (4) or remainder (2) size::

    master:    read g; read g, m, v, master (not the param); write p, m, v, master = 2 + (2+8+4) + (2+8+4) = 30
    remainder: read g; read p, rem, g, m, v; write p, rem, m, v                  = 2 + (2+2+2+8) + (2+2+8) = 28
    sr:        as the default (the random bits are computed, not loaded)                                = 24
    sr-bf16-states: s = 2                                                     = 2 + (2+2+4) + (2+4)     = 16
    optimizer state bytes per param: 2 s + c = default/sr 8, master 12, remainder 10, sr-bf16-states 4

The bandwidth floor of a case is ``fused_bytes / measured copy bandwidth`` (read+write bytes per second).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ALL_CASES",
    "CPU_CASES",
    "MODE_CASES",
    "GPU_CASES",
    "GROUP_CASES",
    "PARAM_STD",
    "SHAPE_SETS",
    "Case",
    "Shape",
    "MODES",
    "fused_bytes_per_param",
    "state_bytes_per_param",
    "gpt_shapes",
    "decay_split",
    "make_grads",
    "make_params",
    "refill_params_",
    "select_cases",
]

Shape = tuple[int, ...]

#: Parameters are N(0, PARAM_STD^2), like GPT-2's initialisation.
PARAM_STD = 0.02
_STATE_BYTES = 4  # fusedlr keeps exp_avg / exp_avg_sq in float32 for fp32/bf16/fp16 params by default

#: Precision modes of the fusedlr pipelines (bf16 cases): mode name -> ``fusedlr.AdamW`` keyword arguments.
MODES: dict[str, dict[str, object]] = {
    "": {},
    "sr": {"stochastic_rounding": True},
    "sr-bf16-states": {"stochastic_rounding": True, "state_dtype": torch.bfloat16},
    "master": {"master_weights": True},
    "remainder": {"master_weights": "remainder"},
}


def _mode_sizes(mode: str) -> tuple[int, int]:
    """(bytes of one moment, bytes of the master copy or remainder) per parameter in ``mode``."""
    options = MODES[mode]
    moment = 2 if options.get("state_dtype") is torch.bfloat16 else _STATE_BYTES
    master = {True: 4, "remainder": 2}.get(options.get("master_weights", False), 0)  # type: ignore[arg-type]
    return moment, master


def state_bytes_per_param(mode: str = "") -> int:
    """Optimizer state bytes per parameter (moments and master, not the step counters) in ``mode``."""
    moment, master = _mode_sizes(mode)
    return 2 * moment + master


def gpt_shapes(vocab: int, d: int, layers: int, seq: int) -> list[tuple[str, Shape]]:
    """Named parameter shapes of a GPT-2 style model (HF ``GPT2LMHeadModel`` layout, tied LM head)."""
    shapes: list[tuple[str, Shape]] = [("wte", (vocab, d)), ("wpe", (seq, d))]
    for i in range(layers):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    return shapes + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def _many(n: int, numel: int) -> list[tuple[str, Shape]]:
    return [(f"t{i}", (numel,)) for i in range(n)]


#: Shape sets: name -> named shapes. The first three are the GPU cases, the tiny ones the CPU smoke cases.
SHAPE_SETS: dict[str, list[tuple[str, Shape]]] = {
    "gpt2-124m": gpt_shapes(vocab=50257, d=768, layers=12, seq=1024),
    "gpt-1.3b": gpt_shapes(vocab=50304, d=2048, layers=24, seq=2048),
    "2000x4096": _many(2000, 4096),
    # tiny: the CPU smoke test also runs the Triton interpreter (TRITON_INTERPRET=1), ~25 ms per tensor per step
    "tiny-gpt": gpt_shapes(vocab=128, d=16, layers=1, seq=32),
    "tiny-many": _many(16, 256),
}

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fused_bytes_per_param(param_dtype: torch.dtype, grad_dtype: torch.dtype | None = None, mode: str = "") -> int:
    """Bytes a fused step moves per parameter (see the module docstring): 32 for fp32, 24 for bf16 (default mode)."""
    p = torch.empty((), dtype=param_dtype).element_size()
    g = torch.empty((), dtype=grad_dtype or param_dtype).element_size()
    moment, master = _mode_sizes(mode)
    reduction = g
    read_param = 0 if MODES[mode].get("master_weights") is True else p  # the update reads the master instead
    update = (read_param + master + g + 2 * moment) + (p + master + 2 * moment)
    return reduction + update


@dataclass(frozen=True)
class Case:
    """One benchmark case: a shape set with one parameter dtype (grads have the parameter dtype), a
    precision mode of the fusedlr pipelines (``MODES``; "" the default) and the number of param groups:
    1, or 2 as Hugging Face's Trainer makes them (weight decay on the matrices, none on the 1-D tensors:
    ``decay_split``), which every pipeline of the case, torch's included, then uses."""

    shape_set: str
    dtype_name: str
    mode: str = ""
    groups: int = 1

    @property
    def name(self) -> str:
        base = f"{self.shape_set}-{self.dtype_name}"
        base = f"{base}-{self.mode}" if self.mode else base
        return f"{base}-{self.groups}groups" if self.groups > 1 else base

    @property
    def options(self) -> dict[str, object]:
        """The ``fusedlr.AdamW`` keyword arguments of the mode."""
        return MODES[self.mode]

    @property
    def named_shapes(self) -> list[tuple[str, Shape]]:
        return SHAPE_SETS[self.shape_set]

    @property
    def shapes(self) -> list[Shape]:
        return [s for _, s in self.named_shapes]

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype_name]

    @property
    def num_tensors(self) -> int:
        return len(self.named_shapes)

    @property
    def num_params(self) -> int:
        total = 0
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            total += n
        return total

    @property
    def fused_bytes(self) -> int:
        """Bytes one fused step must move for this case."""
        return self.num_params * fused_bytes_per_param(self.dtype, mode=self.mode)

    @property
    def state_bytes_per_param(self) -> int:
        """fusedlr's optimizer state bytes per parameter in this case's mode."""
        return state_bytes_per_param(self.mode)

    def memory_needed(self) -> int:
        """Rough device bytes to benchmark this case: shared grads, one pipeline's grad copy, params,
        states, a reference snapshot for the agreement check and ~8 B/param of workspace."""
        e = torch.empty((), dtype=self.dtype).element_size()
        return self.num_params * (2 * e + 2 * e + max(self.state_bytes_per_param, 2 * _STATE_BYTES) + 8)


#: The last two have two param groups (decay / no decay), whose update is one launch for both groups.
GPU_CASES: list[Case] = [Case(s, d) for s in ("gpt2-124m", "gpt-1.3b", "2000x4096") for d in ("fp32", "bf16")] + [
    Case("gpt2-124m", d, groups=2) for d in ("fp32", "bf16")
]
#: Two param groups on the CPU (run on request, ``--cases tiny-gpt-fp32-2groups``).
GROUP_CASES: list[Case] = [Case("tiny-gpt", "fp32", groups=2)]
CPU_CASES: list[Case] = [Case(s, d) for s in ("tiny-gpt", "tiny-many") for d in ("fp32", "bf16")]
#: The precision modes, on bf16 params (run on request: ``--cases modes`` / ``--cases cpu-modes``).
MODE_CASES: list[Case] = [Case(s, "bf16", m) for s in ("gpt2-124m", "tiny-gpt") for m in MODES if m]
ALL_CASES: dict[str, Case] = {c.name: c for c in GPU_CASES + CPU_CASES + MODE_CASES + GROUP_CASES}


def select_cases(spec: str | None, default: list[Case]) -> list[Case]:
    """Cases named by a comma list of case names (``gpt2-124m-fp32``), shape-set names (``gpt-1.3b``:
    both dtypes) or ``all``; ``default`` when ``spec`` is empty. Raises ValueError on an unknown name."""
    if not spec:
        return list(default)
    out: list[Case] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token == "all":
            found = GPU_CASES + CPU_CASES
        elif token in ("modes", "cpu-modes"):
            found = [c for c in MODE_CASES if (c.shape_set == "tiny-gpt") == (token == "cpu-modes")]
        elif token in ALL_CASES:
            found = [ALL_CASES[token]]
        elif token in SHAPE_SETS:
            found = [c for c in ALL_CASES.values() if c.shape_set == token and not c.mode and c.groups == 1]
        else:
            raise ValueError(f"unknown case {token!r}; choose from {', '.join(ALL_CASES)} or {', '.join(SHAPE_SETS)}")
        out += [c for c in found if c not in out]
    return out


def _random(shapes: list[Shape], seed: int, std: float, dtype: torch.dtype, device: torch.device) -> Iterator[Tensor]:
    """Deterministic N(0, std^2) tensors, one per shape (generated in fp32, then cast)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for shape in shapes:
        t = torch.randn(shape, generator=gen, dtype=torch.float32, device=device)
        yield t.mul_(std).to(dtype)


def decay_split(case: Case) -> list[list[int]]:
    """The indices of ``case``'s tensors per param group: one group, or (``case.groups == 2``) the tensors of
    two or more dimensions (weight decay) and the 1-D ones (biases and norms: no weight decay)."""
    if case.groups == 1:
        return [list(range(case.num_tensors))]
    return [[i for i, s in enumerate(case.shapes) if len(s) > 1], [i for i, s in enumerate(case.shapes) if len(s) <= 1]]


def make_params(case: Case, device: torch.device, seed: int = 0) -> list[Tensor]:
    """Fresh parameters of ``case`` (the same values for the same seed and device)."""
    return [t.requires_grad_(True) for t in _random(case.shapes, seed, PARAM_STD, case.dtype, device)]


@torch.no_grad()
def refill_params_(params: list[Tensor], case: Case, seed: int = 0) -> None:
    """Reset ``params`` in place to the values ``make_params(case, device, seed)`` returns."""
    for p, t in zip(params, _random(case.shapes, seed, PARAM_STD, case.dtype, params[0].device)):
        p.copy_(t)


def make_grads(case: Case, device: torch.device, scale: float, seed: int = 1) -> list[Tensor]:
    """Gradients N(0, 1) times ``scale`` (the GradScaler scale: what ``backward`` of a scaled loss gives)."""
    return list(_random(case.shapes, seed, scale, case.dtype, device))
