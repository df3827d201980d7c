"""``microlora reader train|install``: the shared adapter that teaches the base model to answer
from composed atoms."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from microlora.commands.options import (
    StageBars,
    base_dtype_option,
    model_options,
    recipe_options,
    store_option,
)
from microlora.core.config import AskConfig


@click.group()
def reader() -> None:
    """Train and install a reader: one small adapter per base model, composed beside the
    retrieved atoms, that turns "the atoms are composed in" into short answers."""


@reader.command("train")
@click.option("--data", "data_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="QA data: cpkc-style JSONL (benchmarks/data/cpkc_dev.jsonl).")
@click.option("--split", type=click.Choice(["tune", "eval", "all"]), default="tune",
              show_default=True, help="Rows to train on; keep `eval` for evaluating.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True,
              help="Questions (and their passages) to train on.")
@click.option("--distractors", type=click.IntRange(0), default=0, show_default=True,
              help="Passages compiled beside them but not asked about.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The reader folder to write (PEFT LoRA + microlora-reader.json).")
@click.option("-k", "k", default=AskConfig.k, show_default=True, type=click.IntRange(1),
              help="Atoms composed per question, as `ask` will.")
@click.option("--reader-rank", default=8, show_default=True, type=click.IntRange(1, 64))
@click.option("--epochs", default=4, show_default=True, type=click.IntRange(1))
@click.option("--reader-lr", default=1e-3, show_default=True, type=click.FloatRange(0))
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the compiled training store here [default: a temporary directory].")
@recipe_options
@model_options
@base_dtype_option(from_store=False)
def train(data_path, split, limit, distractors, out, k, reader_rank, epochs, reader_lr,
          workdir, recipe, base_model, embedder, device, base_dtype) -> None:
    """Train a reader on QA data: the data's passages are compiled with the recipe options
    (use the recipe your stores use), each question's atoms retrieved, and the reader trained
    to give the answer with them composed beside it.

    \b
    Example (about 5 minutes on 2 CPU cores, most of it compiling 100 passages):
      microlora reader train --data benchmarks/data/cpkc_dev.jsonl --out ~/readers/gemma
      microlora reader install ~/readers/gemma --store ~/kb
    """
    from microlora.core.config import ReaderConfig
    from microlora.core.embedder import load_embedder
    from microlora.core.models import load_base_model
    from microlora.evaluation.datasets import load_dataset
    from microlora.evaluation.reader import build_reader

    train_config, chunk = recipe
    dataset = load_dataset(data_path, "cpkc", limit=limit, distractors=distractors,
                           split=split)
    base = load_base_model(base_model, device=device, dtype=base_dtype)
    emb = load_embedder(embedder, device=device)
    config = ReaderConfig(rank=reader_rank, lr=reader_lr, epochs=epochs,
                          targets=train_config.targets)
    progress = StageBars({"compile": "atom", "train": "step"})
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = build_reader(dataset, workdir or tmp, out, base, emb, k=k, train=train_config,
                                  chunk=chunk, config=config, progress=progress)
        finally:
            progress.close()
    click.echo(f"wrote a reader trained on {len(dataset.items)} questions ({split} split) "
               f"to {folder}; install it with `microlora reader install {folder} --store DIR`")


@reader.command("install")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@store_option(help="The store whose answers the reader joins.")
def install(folder: Path, store_dir: Path) -> None:
    """Copy the reader in FOLDER into a store; `ask`, `serve` and `eval` then compose it beside
    the atoms (`ask --no-reader` to leave it out). Checked against the store's base model."""
    from store import AdapterStore

    with AdapterStore(store_dir) as store:
        info = store.install_reader(folder)
    click.echo(f"installed the reader ({info.get('questions')} training questions) into "
               f"{store_dir}")
