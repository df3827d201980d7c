"""Which linear layers of a base model get adapters.

A target is named by patterns relative to a decoder block ("mlp.*", "self_attn.q_proj") and by
which blocks: the last N ("late-stage LoRA") or explicit indices. The same spec works for
Gemma, Llama/Qwen (``model.layers.N``) and GPT-2 (``transformer.h.N``, whose linears are
transformers' ``Conv1D``).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn

from microlora.core.config import TargetSpec
from microlora.core.errors import TargetError


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D (GPT-2), which is a linear with a transposed weight, or
    a ``microlora.core.quant.QuantizedLinear`` (a base loaded in int8 or int4)."""
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D",
                                                                       "QuantizedLinear")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear; Conv1D stores its weight as (in, out), and a
    quantized linear keeps no float weight."""
    if type(module).__name__ == "QuantizedLinear":
        return module.in_features, module.out_features
    w = module.weight
    return (w.shape[0], w.shape[1]) if type(module).__name__ == "Conv1D" else \
        (w.shape[1], w.shape[0])


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the one as long as the config's layer count, else the
    longest ModuleList in the model."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise TargetError(f"{type(model).__name__} has no list of decoder blocks to adapt")
    exact = [(name, m) for name, m in lists if len(m) == n_layers]
    return max(exact or lists, key=lambda nm: len(nm[1]))


def blocks_dtype(model: nn.Module) -> torch.dtype:
    """The float dtype the decoder blocks compute in: what adapters train and compose in.
    The token embedding and output layer may be held in another
    (``core.models.hold_vocabulary_in_bf16``), so the first parameter does not say."""
    _, blocks = find_blocks(model)
    return next(p.dtype for p in blocks.parameters() if p.is_floating_point())


def select_targets(model: nn.Module, spec: TargetSpec) -> dict[str, nn.Module]:
    """Map full module names to the linear layers that ``spec`` selects, in model order."""
    prefix, blocks = find_blocks(model)
    chosen: dict[str, nn.Module] = {}
    for i in spec.block_indices(len(blocks)):
        for rel, module in blocks[i].named_modules():
            if is_linear(module) and any(fnmatchcase(rel, p) for p in spec.modules):
                chosen[f"{prefix}.{i}.{rel}"] = module
    if not chosen:
        available = sorted(rel for rel, m in blocks[0].named_modules() if is_linear(m))
        raise TargetError(
            f"target patterns {list(spec.modules)} matched no linear layer; "
            f"a block of this model has: {', '.join(available)}"
        )
    return chosen
