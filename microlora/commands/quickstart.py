"""``microlora quickstart``: the whole loop on a tiny packaged corpus, in about a minute."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import click

from microlora.commands.options import base_dtype_option, model_options, store_option
from microlora.commands.words import plural
from microlora.core.config import AskConfig

NAMESPACE = "quickstart"


def corpus_dir() -> Path:
    """The packaged example corpus: invented facts no base model can know, and questions."""
    return Path(str(resources.files("microlora") / "quickstart"))


def load_questions() -> list[dict]:
    """The packaged questions: question, expected answer, and kind (direct, pronoun: the
    fact's sentence names its subject only as "she", 2 sentences: the answer joins two)."""
    return json.loads((corpus_dir() / "questions.json").read_text())


@click.command()
@store_option(required=False, help="Where to build the example store "
                                   "[default: quickstart/ under the cache directory].")
@click.option("--fresh", is_flag=True, help="Delete the example store and compile it again.")
@click.option("-k", "k", default=AskConfig.k, show_default=True, type=click.IntRange(1),
              help="Atoms retrieved per question.")
@model_options
@base_dtype_option(from_store=False)
def quickstart(store_dir: Path | None, fresh: bool, k: int, base_model, embedder,
               device, base_dtype) -> None:
    """Compile a tiny corpus of invented facts, then answer questions about it three ways,
    side by side: the base model alone (closed book), the retrieved atoms' paragraphs in the
    prompt (passage RAG, ``ask --mode context``), and the retrieved atoms' adapters composed
    in with nothing but the question in the prompt (``ask``, the default).

    The base model cannot know these facts, so a right answer in the last column came from
    the composed adapters. Everything is deterministic: the same install prints the same
    answers on any machine of the same kind (the base dtype it prints among them).
    """
    from tqdm import tqdm

    from compiler.pipeline import compile_corpus
    from microlora.core.embedder import load_embedder
    from microlora.core.models import default_model_dir, ensure_default_model, load_base_model
    from microlora.core.paths import microlora_home

    store_dir = Path(store_dir or microlora_home() / "quickstart").expanduser()
    if fresh and store_dir.exists():
        shutil.rmtree(store_dir)
    docs = sorted(corpus_dir().glob("*.md"))
    questions = load_questions()

    if base_model is None and not default_model_dir().exists():
        click.echo("Converting the packaged Gemma 3 270M GGUF to safetensors (once, a minute "
                   "or two):", err=True)  # progress on stderr: stdout is the same every run
        ensure_default_model(progress=lambda message: click.echo(f"  {message}", err=True))
    base = load_base_model(base_model, device=device, dtype=base_dtype)
    emb = load_embedder(embedder, device=device)
    click.echo(f"1. compile {plural(len(docs), 'document')} ({', '.join(d.name for d in docs)}) "
               f"-> {store_dir}\n   base model {base.name} in {base.base_dtype}")
    with tqdm(total=0, unit="atom", desc="   training") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        report = compile_corpus(docs, store_dir, base=base, embedder=emb, namespace=NAMESPACE,
                                progress=progress)
    click.echo(f"   {plural(report.atoms, 'atom')}, {report.trained} trained"
               + (f" in {report.seconds:.0f} s" if report.trained else " (already compiled)"))
    click.echo(f"2. ask {plural(len(questions), 'question')} three ways, with "
               f"{plural(k, 'retrieved atom')} each:\n"
               "   closed book  the base model alone\n"
               "   passage RAG  the atom's paragraph in the prompt (ask --mode context)\n"
               "   adapters     the atom's adapter composed in, only the question in the "
               "prompt (ask)\n")
    for line in _answer_table(store_dir, base, emb, questions, k):
        click.echo(line)
    click.echo("\nNext:\n"
               f"  microlora ask \"{questions[0]['question']}\" --store {store_dir} --explain\n"
               f"  microlora compile YOUR_DOCS/ --store ~/kb && microlora ask \"...\" --store ~/kb")


def _answer_table(store_dir: Path, base, emb, questions: list[dict], k: int) -> list[str]:
    """Every question answered closed book, from passages and from adapters, in three
    batches; the table and its summary as lines."""
    from composer import Composer
    from microlora.commands.quickstart_table import Column, summary, table
    from store import AdapterStore

    asked = [q["question"] for q in questions]
    ways = [("closed book", AskConfig(mode="none")),
            ("passage RAG", AskConfig(mode="context", k=k)), ("adapters", AskConfig(k=k))]
    with Composer(AdapterStore(store_dir, readonly=True), base, emb) as composer:
        columns = [Column(name, [a.text for a in composer.ask_batch(asked, [NAMESPACE], config)])
                   for name, config in ways]
    return table(questions, columns) + [""] + summary(questions, columns)
