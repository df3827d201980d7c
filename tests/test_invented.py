"""The invented documents the reader trains on: answerable only from the document, every kind
of question, the same rows for the same seed, and readable by the dataset loader."""

from collections import Counter

from microlora.evaluation.datasets import load_dataset
from microlora.evaluation.invented import KINDS, invent_rows, write_rows


def test_every_answer_is_a_span_of_its_document_and_every_kind_is_asked():
    rows = invent_rows(60, seed=3)
    assert all(r["answer"] and r["answer"] in r["context"] for r in rows)
    assert Counter(r["kind"] for r in rows).keys() == {"direct", "pronoun", "bridge"}
    contexts = {r["context"] for r in rows}
    assert len(contexts) == 60  # one paragraph per document, no two alike
    assert all(4 <= c.count(". ") + 1 <= 5 for c in contexts)
    assert len(rows) >= 5 * 60  # ~6.6 questions a document: 310 documents give ~2,000


def test_the_same_seed_gives_the_same_rows_and_another_seed_other_names():
    assert invent_rows(12, seed=1) == invent_rows(12, seed=1)
    first = {r["context"] for r in invent_rows(12, seed=1)}
    assert first.isdisjoint({r["context"] for r in invent_rows(12, seed=2)})


def test_each_document_kind_is_used_and_the_loader_groups_rows_by_document(tmp_path):
    rows = invent_rows(2 * len(KINDS))
    path = write_rows(rows, tmp_path / "inv.jsonl")
    ds = load_dataset(path, "cpkc", split="all")
    assert len(ds.passages) == 2 * len(KINDS) and len(ds.items) == len(rows)
    assert {it.kind for it in ds.items} == {"direct", "pronoun", "bridge"}
