"""``microlora ask``: answer a question from a store's composed adapters."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from microlora.commands.options import (
    adapt_prefix_option,
    base_dtype_option,
    model_options,
    store_option,
)
from microlora.commands.words import plural
from microlora.core.config import COMPOSITIONS, HYBRIDS, MODES, WEIGHTINGS, AskConfig
from microlora.core.provenance import cite

_ASK = AskConfig()  # the defaults: one source, the dataclass


@click.command("ask")
@click.argument("question")
@store_option(help="The store to answer from (made by `microlora compile`).")
@click.option("--namespace", "-n", "namespaces", multiple=True,
              help="Namespace to search; repeat to layer several (e.g. -n user:ana -n wiki) "
                   "[default: every shared namespace, no user:* ones].")
@click.option("--mode", type=click.Choice(MODES), default=_ASK.mode.value, show_default=True,
              help="parametric: composed adapters only; context: the atoms' text in the "
                   "prompt (classic RAG); hybrid: both; none: the base model, closed book.")
@click.option("-k", "k", default=_ASK.k, show_default=True, type=click.IntRange(1),
              help="Atoms to retrieve and compose.")
@click.option("--min-score", type=float, default=_ASK.min_score,
              show_default=True,
              help="Drop atoms whose cosine similarity to the question is below this; with "
                   "none left, say that nothing relevant was found.")
@click.option("--weighting", type=click.Choice(WEIGHTINGS), default=_ASK.weighting,
              show_default=True, help="Weight of each atom's delta: 1, its score "
                                      "normalised to mean 1, or 1/k (their mean).")
@click.option("--composition", type=click.Choice(COMPOSITIONS), default=_ASK.composition,
              show_default=True, help="stacked: per-request adapters beside the frozen "
                                      "weights; merged: W += delta, restored after.")
@click.option("--max-new-tokens", default=_ASK.max_new_tokens, show_default=True,
              type=click.IntRange(1),
              help="Longest answer, in tokens.")
@click.option("--end-bias", default=_ASK.end_bias, show_default=True, type=float,
              help="Bonus to the line-break logits once an answer has begun, so a short "
                   "answer stops after its name (0 = plain greedy).")
@click.option("--window-tokens", type=click.IntRange(0), default=_ASK.window_tokens,
              show_default=True, help="context and hybrid modes: each atom's window in the "
                                      "prompt, in tokens: its sentence and its paragraph "
                                      "around it (0: the sentence alone).")
@click.option("--hybrid", type=click.Choice(HYBRIDS), default=_ASK.hybrid, show_default=True,
              help="--mode hybrid: ensemble decodes from the adapters (bare question) and the "
                   "passages (no adapters) together; gated trusts the passages wherever they "
                   "are sure; rerank decodes both alone and keeps the likelier answer; joint "
                   "puts both into one prompt.")
@click.option("--passage-weight", default=_ASK.passage_weight, show_default=True,
              type=click.FloatRange(0),
              help="Ensemble hybrid: weight of the passages' log-probabilities against the "
                   "adapters' (1).")
@click.option("--no-reader", is_flag=True,
              help="Leave out the store's reader adapter (if `microlora reader install` "
                   "gave it one).")
@adapt_prefix_option
@click.option("--explain", is_flag=True, help="List the atoms used, with scores and sources.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as one JSON object.")
@model_options
@base_dtype_option()
def ask_command(question, store_dir: Path, namespaces, mode, k, min_score, weighting,
                composition, max_new_tokens, end_bias, window_tokens, hybrid, passage_weight,
                no_reader, adapt_prefix, explain, as_json, base_model, embedder, device,
                base_dtype) -> None:
    """Answer QUESTION from the adapters of the atoms it retrieves.

    The question is embedded, the k most similar atoms are found in the store's FAISS
    indexes, their adapters are summed into the base model for this one question, and the
    answer is streamed as it is generated.

    \b
    Examples:
      microlora ask "Who founded Brightwater Clockworks?" --store ~/kb --explain
      microlora ask "..." --store ~/kb -n user:ana -n wiki --mode hybrid
    """
    from composer import Composer

    config = AskConfig(mode=mode, k=k, min_score=min_score, weighting=weighting,
                       composition=composition, max_new_tokens=max_new_tokens,
                       end_bias=end_bias, window_tokens=window_tokens, hybrid=hybrid,
                       passage_weight=passage_weight, reader=not no_reader,
                       adapt_prefix=adapt_prefix)
    with Composer.open(store_dir, base_model=base_model, embedder=embedder,
                       device=device, base_dtype=base_dtype) as composer:
        stream = None if as_json else (lambda text: click.echo(text, nl=False))
        answer = composer.ask(question, namespaces or None, config, on_text=stream)
    if as_json:
        click.echo(json.dumps({
            "question": answer.question, "answer": answer.text, "mode": answer.mode.value,
            "seconds": round(answer.seconds, 3), "new_tokens": answer.new_tokens,
            "sources": [{**asdict(s.hit), "text": s.text, "source": s.source,
                         "start": s.start, "end": s.end, "page": s.page or None,
                         "section": s.section, "citation": cite(s.source, s.page, s.section)}
                        for s in answer.sources]}))
        return
    click.echo()
    if explain:
        used = "composed" if config.mode.uses_adapters else "in the prompt"
        if not answer.sources:
            click.echo(f"(no atoms: mode {mode})", err=True)
        else:
            click.echo(f"\n{plural(len(answer.sources), 'atom')} {used} ({mode}, {composition}):",
                       err=True)
        for i, s in enumerate(answer.sources, 1):
            click.echo(f"{i:3d}. {s.hit.score:.3f}  w={s.hit.weight:.2f}  [{s.hit.namespace}] "
                       f"{cite(s.source, s.page, s.section, s.start, s.end)}  {s.text[:80]!r}",
                       err=True)
