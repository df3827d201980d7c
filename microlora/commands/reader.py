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
from microlora.core.config import AskConfig, ReaderConfig


@click.group()
def reader() -> None:
    """Train and install a reader: one small adapter per base model, composed beside the
    retrieved atoms, that turns "the atoms are composed in" into short answers."""


@reader.command("train")
@click.option("--data", "data_path",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Your own QA data (cpkc-style JSONL: id, question, context, answer) "
                   "[default: invented documents, see --documents].")
@click.option("--documents", type=click.IntRange(1), default=310, show_default=True,
              help="Without --data: invented documents to train on (made up names, 4-5 "
                   "sentences, about 6.6 questions each: 310 give ~2,000 questions).")
@click.option("--split", type=click.Choice(["tune", "eval", "all"]), default="all",
              show_default=True, help="With --data: rows to train on.")
@click.option("--limit", type=click.IntRange(1),
              help="With --data: passages to train on (and their questions) [default: all].")
@click.option("--distractors", type=click.IntRange(0), default=0, show_default=True,
              help="With --data: passages compiled beside them but not asked about.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The reader folder to write (PEFT LoRA + microlora-reader.json).")
@click.option("-k", "k", default=AskConfig.k, show_default=True, type=click.IntRange(1),
              help="Atoms composed per question, as `ask` will.")
@click.option("--reader-rank", default=ReaderConfig.rank, show_default=True,
              type=click.IntRange(1, 64), help="The reader's LoRA rank.")
@click.option("--epochs", default=ReaderConfig.epochs, show_default=True, type=click.IntRange(1),
              help="Passes over the questions.")
@click.option("--reader-lr", default=ReaderConfig.lr, show_default=True,
              type=click.FloatRange(0), help="Adam's learning rate for the reader.")
@click.option("--answerable-only/--all-questions", default=ReaderConfig.answerable_only,
              show_default=True,
              help="Train only on questions whose retrieved atoms' text holds the answer "
                   "(the rest teach the reader to guess).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the compiled training store here [default: a temporary directory].")
@recipe_options
@model_options
@base_dtype_option(from_store=False)
def train(data_path, documents, split, limit, distractors, out, k, reader_rank, epochs, reader_lr,
          answerable_only, workdir, recipe, base_model, embedder, device, base_dtype) -> None:
    """Train a reader on QA data: the passages are compiled with the recipe options (use the
    recipe your stores use), each question's atoms retrieved, and the reader trained to give
    the answer with them composed beside it. Without --data it trains on invented documents
    (microlora.evaluation.invented), never on benchmark rows.

    \b
    Example (about 1 hour on 2 CPU cores, most of it compiling ~1,300 atoms):
      microlora reader train --out ~/readers/gemma
      microlora reader install ~/readers/gemma --store ~/kb
    """
    from microlora.core.embedder import load_embedder
    from microlora.core.models import load_base_model
    from microlora.evaluation.datasets import load_dataset
    from microlora.evaluation.invented import invent_rows, write_rows
    from microlora.evaluation.reader import build_reader

    train_config, chunk = recipe
    base = load_base_model(base_model, device=device, dtype=base_dtype)
    emb = load_embedder(embedder, device=device)
    config = ReaderConfig(rank=reader_rank, lr=reader_lr, epochs=epochs,
                          targets=train_config.targets, answerable_only=answerable_only)
    progress = StageBars({"compile": "atom", "train": "step"})
    source = f"{data_path.name}, {split} split" if data_path else f"{documents} invented documents"
    with tempfile.TemporaryDirectory() as tmp:
        if data_path is None:
            data_path = write_rows(invent_rows(documents), Path(tmp) / "invented.jsonl")
            split, limit, distractors = "all", documents, 0
        dataset = load_dataset(data_path, "cpkc", limit=limit, distractors=distractors,
                               split=split)
        try:
            folder = build_reader(dataset, workdir or Path(tmp) / "work", out, base, emb, k=k,
                                  train=train_config, chunk=chunk, config=config,
                                  progress=progress)
        finally:
            progress.close()
    click.echo(f"wrote a reader trained on {len(dataset.items)} questions ({source}) "
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
