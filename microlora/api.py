"""The Python API: what the CLI does, as functions. It imports the stages lazily (compiler,
composer) because those import microlora's core."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from microlora.core.config import TargetSpec


def compile(  # noqa: A001 - mirrors the CLI verb
    paths: Sequence[str | Path],
    store: str | Path,
    *,
    namespace: str = "default",
    base_model: str | Path | None = None,
    embedder: str | Path | None = None,
    device: str | None = None,
    base_dtype: str | None = None,
    prune: bool = False,
    dry_run: bool = False,
    max_atom_tokens: int = 64,
    targets: TargetSpec | None = None,
    **recipe,
):
    """Compile documents (files or directories of .txt, .md, .jsonl) into a store namespace.

    ``recipe`` takes ``compiler.trainer.TrainConfig`` fields (rank, lr, max_steps, neighbours,
    batch_atoms, ...). ``base_dtype``: "auto", "fp32", "bf16", "int8" or "int4" (default: the
    store's, or "auto" for a new store: bf16 where bf16 matmuls are fast, else fp32). Returns a
    ``compiler.pipeline.CompileReport``.
    """
    from compiler.pipeline import compile_corpus
    from microlora.core.config import ChunkConfig, TrainConfig
    from microlora.core.embedder import load_embedder
    from microlora.core.models import load_base_model
    from store import stored_base_dtype

    config = TrainConfig(**recipe, **({"targets": targets} if targets else {}))
    base = load_base_model(base_model, device=device,
                           dtype=base_dtype or stored_base_dtype(store))
    return compile_corpus(
        paths, store, base=base,
        embedder=load_embedder(embedder, device=device), namespace=namespace,
        train_config=config, chunk_config=ChunkConfig(max_tokens=max_atom_tokens),
        prune=prune, dry_run=dry_run)


def ask(
    question: str,
    store: str | Path,
    *,
    namespaces: Sequence[str] | None = None,
    base_model: str | Path | None = None,
    embedder: str | Path | None = None,
    device: str | None = None,
    base_dtype: str | None = None,
    **config,
):
    """Answer one question from a store: retrieve its atoms, compose their adapters, generate.

    ``config`` takes ``composer.AskConfig`` fields (mode, k, min_score, weighting,
    composition, max_new_tokens); ``base_dtype`` overrides the store's (``compile``). This
    loads the models on every call; to ask many questions,
    keep a ``microlora.Composer.open(store)`` and call its ``ask``. Returns a
    ``composer.Answer`` (text, sources with scores, timing).
    """
    from composer import Composer
    from microlora.core.config import AskConfig

    with Composer.open(store, base_model=base_model, embedder=embedder, device=device,
                       base_dtype=base_dtype) as c:
        return c.ask(question, namespaces, AskConfig(**config))
