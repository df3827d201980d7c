"""KV caches as this transformers version takes them: one place for the spelling that changed
(``cache=`` since 5.x, ``past_key_values=`` before), shared by the composer's decoding and
prompt-prefix reuse and the compiler's teacher, which reads each atom's window once."""

from __future__ import annotations

import inspect

from torch import nn
from transformers import DynamicCache


def new_cache(model: nn.Module) -> dict[str, DynamicCache]:
    """An empty KV cache, as the keyword ``model``'s forward takes it."""
    try:
        cache = DynamicCache(config=model.config)  # per-layer kinds (sliding window) from it
    except TypeError:
        cache = DynamicCache()
    return {cache_keyword(model): cache}


def cache_keyword(module: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` since transformers 5.x,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters \
        else "past_key_values"
