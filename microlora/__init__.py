"""microlora: compile documents into tiny LoRA adapters, compose them per question.

The names below load lazily, so ``import microlora`` stays cheap and ``store``, ``compiler``
and ``composer`` can import microlora's core without an import cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "compile": "microlora.api",
    "ask": "microlora.api",
    "Composer": "composer",
    "AskConfig": "composer",
    "Answer": "composer",
    "MicroloraError": "microlora.errors",
    "BaseModel": "microlora.models",
    "load_base_model": "microlora.models",
    "fingerprint_model": "microlora.models",
    "Embedder": "microlora.embedder",
    "load_embedder": "microlora.embedder",
    "TargetSpec": "microlora.targets",
    "select_targets": "microlora.targets",
    "MultiLoraLinear": "microlora.lora",
    "MultiLoraModel": "microlora.lora",
    "stack_adapters": "microlora.lora",
    "combine_adapters": "microlora.lora",
    "AdapterStore": "store",
    "AtomRecord": "store",
    "StoreHeader": "store",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from composer import Answer, AskConfig, Composer
    from microlora.api import ask, compile
    from microlora.embedder import Embedder, load_embedder
    from microlora.errors import MicroloraError
    from microlora.lora import MultiLoraLinear, MultiLoraModel, combine_adapters, stack_adapters
    from microlora.models import BaseModel, fingerprint_model, load_base_model
    from microlora.targets import TargetSpec, select_targets
    from store import AdapterStore, AtomRecord, StoreHeader


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'microlora' has no attribute {name!r}")
