"""Options that several commands share, defined once so their help reads the same everywhere."""

from __future__ import annotations

from pathlib import Path

import click


def model_options(f):
    """--base-model, --embedder and --device: which models to load, and where."""
    f = click.option("--device",
                     help="cpu, cuda, cuda:1 ... [default: cuda if present, else cpu].")(f)
    f = click.option("--embedder", type=click.Path(exists=True, file_okay=False),
                     help="Local sentence-transformers folder "
                          "[default: packaged all-MiniLM-L6-v2].")(f)
    return click.option("--base-model", type=click.Path(exists=True, file_okay=False),
                        help="Local Hugging Face causal-LM folder "
                             "[default: packaged Gemma 3 270M].")(f)


def store_option(required: bool = True, help: str = "The store directory."):
    return click.option("--store", "store_dir", required=required,
                        type=click.Path(path_type=Path, file_okay=False), help=help)
