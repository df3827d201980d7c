"""``microlora eval``: how well do composed adapters answer questions about their passages?"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from microlora.commands.options import (
    StageBars,
    adapt_prefix_option,
    adapter_dtype_option,
    base_dtype_option,
    model_options,
    recipe_options,
)
from microlora.core.config import HYBRIDS, WEIGHTINGS, AskConfig

SYSTEM_NAMES = ("closed_book", "rag", "passage_rag", "parametric", "hybrid", "oracle")
_ASK = AskConfig()


@click.command("eval")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True,
              dir_okay=False, path_type=Path),
              help="cpkc-style JSONL (id, question, context, answer[, original_answer, "
                   "kind]; rows sharing a context are one passage) or "
                   "fictional_knowledge.json.")
@click.option("--dataset", "kind", type=click.Choice(["cpkc", "fictional"]), default=None,
              help="Format of --data [default: fictional for .json, else cpkc].")
@click.option("--split", type=click.Choice(["eval", "tune", "all"]), default="eval",
              show_default=True, help="Passages to draw from: tune (the file's last 100 "
                                      "cpkc-style / 30 fictional passages, at most a third "
                                      "of them) to choose settings, eval (the rest) to "
                                      "report.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True,
              help="Passages to ask about (cpkc: one question each; fictional: 15 probes).")
@click.option("--distractors", type=click.IntRange(0), default=50, show_default=True,
              help="Extra passages compiled into the same store but never asked about.")
@click.option("--seed", default=0, show_default=True, help="Which rows are drawn.")
@click.option("-k", "k", type=click.IntRange(1), default=None,
              help="Atoms per question [default: microlora ask's].")
@click.option("--sweep", default="", help="More k values for the retrieving systems (rag, "
                                        "passage_rag, parametric, hybrid), e.g. 1,2,8.")
@click.option("--systems", default=",".join(SYSTEM_NAMES), show_default=True,
              help="Which systems to run.")
@click.option("--weighting", type=click.Choice(WEIGHTINGS), default=_ASK.weighting,
              show_default=True, help="As microlora ask's: 1, score, or 1/k per atom.")
@click.option("--end-bias", type=float, default=_ASK.end_bias, show_default=True,
              help="Added to the line-break logit once an answer has begun.")
@click.option("--window-tokens", type=click.IntRange(0), default=_ASK.window_tokens,
              show_default=True, help="passage_rag and hybrid: each atom's window, in tokens "
                                      "(its sentence and its paragraph around it).")
@click.option("--echo-penalty", type=click.FloatRange(0), default=_ASK.echo_penalty,
              show_default=True, help="Taken off, where adapters are composed, from the "
                                      "tokens that begin a name the question names.")
@click.option("--min-score", type=float, default=_ASK.min_score,
              show_default=True,
              help="Say nothing was found below this retrieval score.")
@click.option("--hybrid", "hybrid", type=click.Choice(HYBRIDS), default=_ASK.hybrid,
              show_default=True, help="How hybrid combines passages and adapters.")
@click.option("--passage-weight", type=click.FloatRange(0), default=_ASK.passage_weight,
              show_default=True,
              help="Ensemble hybrid: weight of the passages' log-probabilities.")
@click.option("--no-repeat-ngram", type=click.IntRange(0), default=_ASK.no_repeat_ngram,
              show_default=True, help="Ban repeating an n-gram of the answer (0: off).")
@adapt_prefix_option
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="RESULT.json; .answers.jsonl, .md and .png are written beside it.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the compiled store here [default: a temporary directory].")
@click.option("--reader", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A reader (`microlora reader train`) to compose beside the atoms.")
@recipe_options
@adapter_dtype_option
@model_options
@base_dtype_option(from_store=False)
def eval_command(data_path, kind, split, limit, distractors, seed, k, sweep, systems,
                 weighting, end_bias, window_tokens, echo_penalty, min_score, hybrid,
                 passage_weight, no_repeat_ngram, adapt_prefix, out, workdir, reader, recipe,
                 store_config, base_model, embedder, device, base_dtype) -> None:
    """Compile the passages of a QA dataset into one fresh store and answer every question
    with each system: closed_book (base model), rag (the atoms' sentences in the prompt),
    passage_rag (their windows in the prompt: `ask --mode context`), parametric (composed
    adapters, no text), hybrid (adapters and windows) and oracle (the gold passage's
    adapters).

    Scores are exact match and token F1 after SQuAD normalisation, "contains" (the answer
    appears in the output), and for counterfactual data the rate at which the real-world
    answer comes out instead. The recipe options are the compile recipe under test.

    \b
    Example (15-20 minutes on 2 CPU cores):
      microlora eval --data benchmarks/data/cpkc_dev.jsonl --limit 100 --out results/qa.json
    """
    from microlora.core.config import AskConfig
    from microlora.core.embedder import load_embedder
    from microlora.core.models import load_base_model
    from microlora.evaluation import EvalConfig, run_eval
    from microlora.evaluation.datasets import load_dataset
    from microlora.evaluation.report import markdown, write_report

    kind = kind or ("fictional" if data_path.suffix == ".json" else "cpkc")
    try:
        ks = tuple(int(x) for x in sweep.split(",") if x.strip())
    except ValueError as e:
        raise click.BadParameter(f"--sweep takes integers like 1,2,8 ({e})") from e
    chosen = tuple(s.strip() for s in systems.split(",") if s.strip())
    if not chosen or set(chosen) - set(SYSTEM_NAMES):
        raise click.BadParameter(f"--systems: choose from {', '.join(SYSTEM_NAMES)}")
    train, chunk = recipe
    dataset = load_dataset(data_path, kind, limit=limit, distractors=distractors, seed=seed,
                           split=split)
    ask = AskConfig(weighting=weighting, end_bias=end_bias, window_tokens=window_tokens,
                    echo_penalty=echo_penalty,
                    min_score=min_score, hybrid=hybrid, passage_weight=passage_weight,
                    no_repeat_ngram=no_repeat_ngram, adapt_prefix=adapt_prefix)
    config = EvalConfig(k=k or AskConfig.k, sweep=ks, systems=chosen, ask=ask, train=train,
                        chunk=chunk, store=store_config, reader=reader)
    base = load_base_model(base_model, device=device, dtype=base_dtype)
    emb = load_embedder(embedder, device=device)
    progress = StageBars({"compile": "atom", "answer": "answer"})
    with tempfile.TemporaryDirectory() as tmp:
        try:
            summary, rows = run_eval(dataset, workdir or tmp, base, emb, config, progress)
        finally:
            progress.close()
    summary.update(split=split, seed=seed, data=str(data_path))
    written = write_report(summary, rows, out)
    click.echo(markdown(summary))
    click.echo("wrote " + ", ".join(map(str, written)))
