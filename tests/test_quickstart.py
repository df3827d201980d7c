"""``microlora quickstart`` on tiny random models: three columns counted, an honest verdict,
and a compile that is the same bit for bit every time."""

import re

import click
import torch
from click.testing import CliRunner

from microlora.cli import cli
from microlora.commands.quickstart import NAMESPACE, corpus_dir, load_questions
from microlora.commands.quickstart_table import Column, summary, table
from microlora.commands.words import plural
from store import AdapterStore


def adapters_of(path):
    """atom id -> (adapter bytes, embedding bytes) of the quickstart namespace."""
    with AdapterStore(path, readonly=True) as s, s.read(NAMESPACE) as reader:
        return {i: (r.adapter.flat.view(torch.int16).numpy().tobytes(), r.embedding.tobytes())
                for i, r in reader.items()}


def test_quickstart_compile_is_the_same_bit_for_bit(tiny_models, tmp_path):
    """Two compiles of the packaged corpus into fresh stores store identical adapters and
    embeddings, bit for bit: atoms are initialised from their ids and trained beside seeded
    company, so nothing depends on the run. (The thread count is torch's default, the same on
    machines of one kind; varying it here would prove little on tiny matrices, whose sums no
    thread count splits.)"""
    from compiler.pipeline import compile_corpus
    from microlora.core.embedder import load_embedder
    from microlora.core.models import load_base_model

    lm, emb_path = tiny_models
    base, emb = load_base_model(lm, dtype="fp32"), load_embedder(emb_path)
    docs = sorted(corpus_dir().glob("*.md"))
    reports = [compile_corpus(docs, tmp_path / folder, base=base, embedder=emb,
                              namespace=NAMESPACE) for folder in "ab"]
    a, b = adapters_of(tmp_path / "a"), adapters_of(tmp_path / "b")
    assert len(a) == reports[0].atoms == reports[0].trained > 10
    assert a == b


def test_quickstart_shows_three_columns_and_says_when_adapters_fall_short(tiny_models, tmp_path):
    lm, emb = tiny_models
    args = ["quickstart", "--base-model", str(lm), "--embedder", str(emb),
            "--store", str(tmp_path / "qs")]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    out = first.stdout
    assert re.search(r"question \(kind\)\n\s+closed book\s+passage RAG\s+adapters\n", out)
    assert "In which city did the founder of Brightwater Clockworks grow up? (2 sentences)" in out
    assert re.search(r"closed book \d/6, passage RAG \d/6, adapters \d/6", out)
    assert "1 retrieved atom each" in out and " 1 atoms" not in out
    assert "Short of the aim: the adapters answered 0 of 6" in out  # a random model knows none
    shown = out[out.index("question (kind)"):out.index("Next:")]
    assert max(map(len, shown.splitlines())) <= 80  # the table and verdict fit a terminal
    again = CliRunner().invoke(cli, args)
    assert "(already compiled)" in again.stdout
    table_of = lambda text: text[text.index("question (kind)"):]  # noqa: E731
    assert table_of(again.stdout) == table_of(out)  # the same answers, run after run


def test_summary_counts_each_column_and_names_what_the_adapters_missed():
    questions = load_questions()
    right = [q["answer"] for q in questions]
    wrong = ["nobody knows"] * len(questions)
    closed = Column("closed book", wrong)
    passages = Column("passage RAG", right)
    five = Column("adapters", right[:-1] + ["nobody"])
    assert summary(questions, [closed, passages, five]) == [
        "right answers: closed book 0/6, passage RAG 6/6, adapters 5/6",
        "(✓: the expected answer appears in the output)"]  # the aim met: no excuse printed
    kinds = {q["kind"] for q in questions}
    four = Column("adapters", [q["answer"] if q["kind"] == "direct" else "x" for q in questions])
    verdict = " ".join(summary(questions, [closed, passages, four])[3:])
    assert verdict.startswith("Short of the aim: the adapters answered "
                              f"{sum(q['kind'] == 'direct' for q in questions)} of 6, ")
    assert "(missed: " + ", ".join(sorted(kinds - {"direct"})) + ")" in verdict
    assert "Passage RAG answers more of them today" in verdict
    rows = table(questions, [closed, passages, four])
    assert len(rows) == 2 + 2 * 6 and rows[2] == questions[0]["question"] + " (direct)"
    answers = click.unstyle(rows[3])
    assert answers.count("✓") == 2 and answers.count("✗") == 1 and len(answers) <= 80


def test_corpus_asks_about_a_pronoun_and_a_fact_spread_over_two_sentences():
    """Each non-direct question's answer sits in a sentence that names nothing the question
    names: a pronoun stands for the subject, or the link to it is in another sentence."""
    sentences = [line for doc in sorted(corpus_dir().glob("*.md"))
                 for line in doc.read_text().splitlines() if line and not line.startswith("#")]
    questions = load_questions()
    assert {q["kind"] for q in questions} == {"direct", "pronoun", "2 sentences"}
    for q in questions:
        named = set(re.findall(r"\b[A-Z][a-z]+", q["question"])[1:])  # not its first word
        names_it = [bool(named & set(s.split())) for s in sentences if q["answer"] in s]
        assert names_it and any(names_it) == (q["kind"] == "direct"), q
    pronoun = next(q for q in questions if q["kind"] == "pronoun")
    assert next(s for s in sentences if pronoun["answer"] in s).startswith(("She ", "He "))


def test_plural():
    assert [plural(n, "atom") for n in (0, 1, 2)] == ["0 atoms", "1 atom", "2 atoms"]
    assert plural(3, "query", "queries") == "3 queries"
