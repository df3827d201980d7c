"""``microlora quickstart``: the whole loop on a tiny packaged corpus, in about a minute."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import click

from microlora.commands.options import model_options, store_option
from microlora.core.config import AskConfig

NAMESPACE = "quickstart"


def corpus_dir() -> Path:
    """The packaged example corpus: invented facts no base model can know, and questions."""
    return Path(str(resources.files("microlora") / "quickstart"))


@click.command()
@store_option(required=False, help="Where to build the example store "
                                   "[default: quickstart/ under the cache directory].")
@click.option("--fresh", is_flag=True, help="Delete the example store and compile it again.")
@click.option("-k", "k", default=AskConfig.k, show_default=True, type=click.IntRange(1),
              help="Atoms composed per question.")
@model_options
def quickstart(store_dir: Path | None, fresh: bool, k: int, base_model, embedder,
               device) -> None:
    """Compile a tiny corpus of invented facts, then answer questions about it twice: with
    the base model alone (closed book) and with the retrieved atoms' adapters composed in.

    The base model cannot know these facts, so every right answer in the second column came
    from the composed adapters. Nothing is put in the prompt but the question.
    """
    from tqdm import tqdm

    from compiler.pipeline import compile_corpus
    from composer import Composer
    from microlora.core.config import AskConfig
    from microlora.core.embedder import load_embedder
    from microlora.core.models import default_model_dir, load_base_model
    from microlora.core.paths import microlora_home
    from store import AdapterStore

    store_dir = Path(store_dir or microlora_home() / "quickstart").expanduser()
    if fresh and store_dir.exists():
        shutil.rmtree(store_dir)
    docs = sorted(corpus_dir().glob("*.md"))
    questions = json.loads((corpus_dir() / "questions.json").read_text())

    if base_model is None and not default_model_dir().exists():
        click.echo("Converting the packaged Gemma 3 270M GGUF to safetensors (once, ~1 min)...")
    base = load_base_model(base_model, device=device)
    emb = load_embedder(embedder, device=device)
    click.echo(f"1. compile {len(docs)} documents ({', '.join(d.name for d in docs)}) "
               f"-> {store_dir}")
    with tqdm(total=0, unit="atom", desc="   training") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        report = compile_corpus(docs, store_dir, base=base, embedder=emb, namespace=NAMESPACE,
                                progress=progress)
    click.echo(f"   {report.atoms} atoms, {report.trained} trained"
               + (f" in {report.seconds:.0f} s" if report.trained else " (already compiled)"))

    click.echo(f"2. ask {len(questions)} questions: closed book vs {k} composed atoms "
               "(no passage text in the prompt)\n")
    asked = [q["question"] for q in questions]
    with Composer(AdapterStore(store_dir, readonly=True), base, emb) as composer:
        closed = composer.ask_batch(asked, config=AskConfig(mode="none"))
        composed = composer.ask_batch(asked, [NAMESPACE], AskConfig(k=k))
    width = min(46, max(len(q) for q in asked))
    col = 26
    click.echo(f"{'question':<{width}}  {'closed book':<{col}}  composed adapters")
    scores = [0, 0]
    for q, a, b in zip(questions, closed, composed):
        marks = []
        for i, ans in enumerate((a, b)):
            ok = q["answer"].lower() in ans.text.lower()
            scores[i] += ok
            marks.append(click.style("✓", fg="green") if ok else click.style("✗", fg="red"))
        click.echo(f"{_fit(q['question'], width)}  {_fit(a.text, col - 2)} {marks[0]}  "
                   f"{_fit(b.text, col - 2)} {marks[1]}")
    n = len(questions)
    click.echo(f"\nright answers: closed book {scores[0]}/{n}, composed adapters {scores[1]}/{n}"
               " (✓ = the expected answer appears in the output)")
    click.echo("\nNext:\n"
               f"  microlora ask \"{asked[0]}\" --store {store_dir} --explain\n"
               f"  microlora compile YOUR_DOCS/ --store ~/kb && microlora ask \"...\" --store ~/kb")


def _fit(text: str, width: int) -> str:
    text = " ".join(text.split()) or "(nothing)"
    return (text if len(text) <= width else text[:width - 1] + "…").ljust(width)
