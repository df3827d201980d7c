"""Options that several commands share, defined once so their help reads the same everywhere."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from microlora.core.config import (
    ADAPTER_DTYPES,
    BASE_DTYPES,
    COMPANIES,
    COMPANY_WEIGHTS,
    DEFAULT_BASE_DTYPE,
    STOP_ON,
    SUBJECT_CONTEXTS,
    VIEW_STYLES,
    AskConfig,
    ChunkConfig,
    StoreConfig,
    TargetSpec,
    TrainConfig,
)


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


def base_dtype_option(from_store: bool = True):
    """--base-dtype: how the base model's weights are held (``load_base_model``'s dtype);
    ``from_store``: a command that opens a store defaults to the dtype it records."""
    default = (f"the store's; a new store: {DEFAULT_BASE_DTYPE}" if from_store
               else DEFAULT_BASE_DTYPE)
    return click.option(
        "--base-dtype", type=click.Choice(BASE_DTYPES),
        help="How the base model's weights are held: auto (bf16 where bf16 matmuls are "
             "the fast ones: a GPU, a CPU with AMX; else fp32), fp32 (the decoder blocks; a "
             "large vocabulary's embedding and output layer in bf16), bf16, or int8 / int4 "
             "weight-only quantized decoder linears (the rest in bf16; int4 on the CPU "
             f"only). A store records int8 and int4 and refuses to mix them [default: "
             f"{default}].")


def adapt_prefix_option(f):
    """--adapt-prefix/--no-adapt-prefix: whether the atoms act on the prompt's few-shot prefix."""
    return click.option(
        "--adapt-prefix/--no-adapt-prefix", default=AskConfig.adapt_prefix,
        help="Compose the atoms over the prompt's worked examples too; with --no-adapt-prefix "
             "the base model alone reads them (computed once) and the atoms act on the "
             "question and the answer only, as they were trained. [default: off for "
             "--mode parametric, on for hybrid]")(f)


def store_option(required: bool = True, help: str = "The store directory."):
    return click.option("--store", "store_dir", required=required,
                        type=click.Path(path_type=Path, file_okay=False), help=help)


def adapter_dtype_option(f):
    """--adapter-dtype, handed to the command as a ``StoreConfig`` named ``store_config``."""
    @functools.wraps(f)
    def command(*args, adapter_dtype: str, **kwargs):
        return f(*args, store_config=StoreConfig(adapter_dtype), **kwargs)

    return click.option("--adapter-dtype", type=click.Choice(ADAPTER_DTYPES),
                        default=StoreConfig.adapter_dtype, show_default=True,
                        help="How the store keeps each new adapter: int8 with one scale per "
                             "row (half the bytes of bf16), or bf16 / fp16.")(command)



_TRAIN, _CHUNK = TrainConfig(), ChunkConfig()  # the defaults: one source, the dataclasses
_RECIPE_OPTIONS = [
    click.option("--rank", default=_TRAIN.rank, show_default=True, type=click.IntRange(1, 8),
                 help="Adapter rank per atom."),
    click.option("--steps", "max_steps", default=_TRAIN.max_steps, show_default=True,
                 type=click.IntRange(1),
                 help="Most optimiser steps per atom (atoms that have learned stop earlier)."),
    click.option("--stop-prob", default=_TRAIN.stop_prob, show_default=True,
                 type=click.FloatRange(0, 1, max_open=True),
                 help="An atom has learned once each of its deciding tokens (--stop-on) "
                      "has this probability."),
    click.option("--stop-on", default=_TRAIN.stop_on, show_default=True,
                 type=click.Choice(STOP_ON),
                 help="Which tokens decide that an atom has learned: all it is taught "
                      "(its sentence and its views' answers), or its question views' answers "
                      "only (atoms without views: their sentence)."),
    click.option("--lr", default=_TRAIN.lr, show_default=True,
                 type=click.FloatRange(0, min_open=True), help="Adam learning rate."),
    click.option("--neighbours", default=_TRAIN.neighbours, show_default=True,
                 type=click.IntRange(0),
                 help="Other atoms composed beside each atom while it trains."),
    click.option("--batch-size", "batch_atoms", default=_TRAIN.batch_atoms, show_default=True,
                 type=click.IntRange(1), help="Atoms trained together per step."),
    click.option("--last-layers", default=_TRAIN.targets.last_layers, show_default=True,
                 type=click.IntRange(1), help="Adapt the MLPs of the last N layers."),
    click.option("--targets", "modules", default=",".join(_TRAIN.targets.modules),
                 show_default=True, help="Comma-separated module patterns inside a layer, "
                                         "e.g. 'mlp.*,self_attn.o_proj'."),
    click.option("--max-atom-tokens", default=_CHUNK.max_tokens, show_default=True,
                 type=click.IntRange(8),
                 help="Split sentences longer than this (base-model tokens)."),
    click.option("--atom-sentences", default=_CHUNK.sentences, show_default=True,
                 type=click.IntRange(1),
                 help="Consecutive sentences of a paragraph per atom, each taught with its "
                      "own question views (1: an atom is a sentence)."),
    click.option("--qa-views", default=_TRAIN.qa_views, show_default=True,
                 type=click.IntRange(0, 8),
                 help="Also train each atom on this many questions about its own names, "
                      "numbers and dates."),
    click.option("--resolve-pronouns/--no-resolve-pronouns", default=_TRAIN.resolve_pronouns,
                 show_default=True,
                 help="Train and embed an atom that opens with He/She/They/His/Her/Their "
                      "with the name it refers to in its place (its paragraph's nearest "
                      "earlier name)."),
    click.option("--view-style", default=_TRAIN.view_style, show_default=True,
                 type=click.Choice(VIEW_STYLES),
                 help="Ask each question view with the whole sentence around its answer, or "
                      "with only the clause around it."),
    click.option("--window-views", default=_TRAIN.window_views, show_default=True,
                 type=click.IntRange(0, 8),
                 help="Also train each atom on the question views of the sentences up to N "
                      "places either side of it in its paragraph."),
    click.option("--company", default=_TRAIN.company, show_default=True,
                 type=click.Choice(COMPANIES),
                 help="Which batch-mates each atom trains beside: random ones, or its nearest "
                      "by embedding (its likely company at query time)."),
    click.option("--company-weight", default=_TRAIN.company_weight, show_default=True,
                 type=click.Choice(COMPANY_WEIGHTS),
                 help="Each atom's weight in the composition it trains in: 'one' (the sum, "
                      "as ask --weighting uniform composes) or 'mean' (1/(1 + neighbours) "
                      "each, as ask --weighting mean composes 1 + neighbours atoms)."),
    click.option("--subject-context", default=_TRAIN.subject_context, show_default=True,
                 type=click.Choice(SUBJECT_CONTEXTS),
                 help="Put a paragraph's subject before each of its sentences that does not "
                      "name it, in the atom's retrieval embedding only, or in what it is "
                      "taught too (pronoun questions name the subject; the sentence may not)."),
    click.option("--distill", default=_TRAIN.distill, show_default=True,
                 type=click.FloatRange(0, 1),
                 help="Share of each question view's target taken from the base model "
                      "answering it with the atom's window in view (0: the answer alone)."),
]


def recipe_options(f):
    """The compile recipe's options, handed to the command as one ``recipe`` argument:
    (TrainConfig, ChunkConfig), bad values as usage errors."""
    names = [opt.name for opt in _recipe_params()]

    @functools.wraps(f)
    def command(*args, **kwargs):
        return f(*args, recipe=build_recipe(**{n: kwargs.pop(n) for n in names}), **kwargs)

    for option in reversed(_RECIPE_OPTIONS):
        command = option(command)
    return command


def _recipe_params() -> list[click.Parameter]:
    """The click parameters the recipe options declare."""
    probe = click.command()(lambda **_: None)
    for option in _RECIPE_OPTIONS:
        probe = option(probe)
    return probe.params


def build_recipe(rank: int, max_steps: int, stop_prob: float, lr: float, neighbours: int,
                 batch_atoms: int, last_layers: int, modules: str, max_atom_tokens: int,
                 qa_views: int = _TRAIN.qa_views, resolve_pronouns: bool = _TRAIN.resolve_pronouns,
                 view_style: str = _TRAIN.view_style, window_views: int = _TRAIN.window_views,
                 distill: float = _TRAIN.distill, company: str = _TRAIN.company,
                 subject_context: str = _TRAIN.subject_context,
                 company_weight: str = _TRAIN.company_weight,
                 atom_sentences: int = _CHUNK.sentences,
                 stop_on: str = _TRAIN.stop_on) -> tuple[TrainConfig, ChunkConfig]:
    """(TrainConfig, ChunkConfig) from the recipe options, with bad values as usage errors."""
    try:
        spec = TargetSpec(modules=tuple(m.strip() for m in modules.split(",") if m.strip()),
                          last_layers=last_layers)
        return (TrainConfig(rank=rank, lr=lr, max_steps=max_steps, stop_prob=stop_prob,
                            neighbours=neighbours, batch_atoms=batch_atoms, targets=spec,
                            qa_views=qa_views, view_style=view_style,
                            resolve_pronouns=resolve_pronouns, window_views=window_views,
                            distill=distill, company=company,
                            subject_context=subject_context,
                            company_weight=company_weight, stop_on=stop_on),
                ChunkConfig(max_tokens=max_atom_tokens, sentences=atom_sentences))
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


class StageBars:
    """One tqdm bar per stage of a long job ("compile", "answer", ...); a stage's bar closes
    when the next stage starts. Call it as ``progress(stage, done, total)``."""

    def __init__(self, units: dict[str, str] | None = None):
        self.units = units or {}
        self.bars: dict = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if stage not in self.bars:
            self.close()
            self.bars[stage] = tqdm(total=total, desc=stage, unit=self.units.get(stage, "it"))
        bar = self.bars[stage]
        bar.total = total
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
