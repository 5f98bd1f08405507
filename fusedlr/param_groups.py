"""Weight-decay parameter groups: the split Hugging Face Trainer makes.

Decay for weights; none for biases and normalization weights (parameters inside an
``nn.LayerNorm``, or whose lower-cased name contains ``bias``, ``layernorm``, ``rmsnorm``, a
``norm`` path component or ``_norm``), as ``Trainer.get_decay_parameter_names`` decides.
Training with ``fusedlr.AdamW(model.parameters(), weight_decay=wd)`` instead decays every
parameter, so it does not match a Trainer run.
"""

from __future__ import annotations

import re
from typing import Any

import torch

__all__ = ["param_groups", "decay_parameter_names"]

_NO_DECAY = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]
_NO_DECAY_LAYERS = (torch.nn.LayerNorm,)


def _names(module: torch.nn.Module) -> list[str]:
    """Trainer's recursion: a name is kept unless its module is a LayerNorm or the name (relative to
    each ancestor, lower-cased) matches a no-decay pattern."""
    out = []
    for child_name, child in module.named_children():
        for n in _names(child):
            full = f"{child_name}.{n}"
            if not isinstance(child, _NO_DECAY_LAYERS) and not any(p.search(full.lower()) for p in _NO_DECAY):
                out.append(full)
    out += [k for k in module._parameters if not any(p.search(k.lower()) for p in _NO_DECAY)]
    return out


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that get weight decay (``Trainer.get_decay_parameter_names``)."""
    return _names(model)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two param groups for ``fusedlr.AdamW`` / ``torch.optim.AdamW``: ``weight_decay`` for the
    weights, 0 for biases and normalization weights (Trainer's split). Only parameters that require
    grad are included; a group with no parameters is left out."""
    decay = set(decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
