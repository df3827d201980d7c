"""microlora: compile documents into tiny LoRA adapters, compose them per question.

The face of the project: the public names below load lazily, so ``import microlora`` stays
cheap (no torch) when the stages import ``microlora.core``, the ground floor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "compile": "microlora.api",
    "ask": "microlora.api",
    "Composer": "composer",
    "Answer": "composer",
    "AskConfig": "microlora.core.config",
    "TrainConfig": "microlora.core.config",
    "ChunkConfig": "microlora.core.config",
    "TargetSpec": "microlora.core.config",
    "Mode": "microlora.core.config",
    "MicroloraError": "microlora.core.errors",
    "BaseModel": "microlora.core.models",
    "load_base_model": "microlora.core.models",
    "fingerprint_model": "microlora.core.models",
    "Embedder": "microlora.core.embedder",
    "load_embedder": "microlora.core.embedder",
    "select_targets": "microlora.core.targets",
    "MultiLoraLinear": "microlora.core.kernel",
    "MultiLoraModel": "microlora.core.kernel",
    "Packed": "microlora.core.pack",
    "compose": "microlora.core.pack",
    "AdapterStore": "store",
    "AtomRecord": "store",
    "StoreHeader": "store",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from composer import Answer, Composer
    from microlora.api import ask, compile
    from microlora.core.config import AskConfig, ChunkConfig, Mode, TargetSpec, TrainConfig
    from microlora.core.embedder import Embedder, load_embedder
    from microlora.core.errors import MicroloraError
    from microlora.core.kernel import MultiLoraLinear, MultiLoraModel
    from microlora.core.models import BaseModel, fingerprint_model, load_base_model
    from microlora.core.pack import Packed, compose
    from microlora.core.targets import select_targets
    from store import AdapterStore, AtomRecord, StoreHeader


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'microlora' has no attribute {name!r}")
