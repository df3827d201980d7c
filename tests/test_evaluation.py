"""The QA harness: metrics, dataset splits, and a whole run on tiny models."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import write_cpkc

from microlora.cli import cli
from microlora.core.config import TrainConfig
from microlora.core.embedder import load_embedder
from microlora.core.errors import MicroloraError
from microlora.core.models import load_base_model
from microlora.evaluation import EvalConfig, run_eval
from microlora.evaluation.datasets import load_dataset
from microlora.evaluation.metrics import contains, exact_match, f1, normalize, starts_with
from microlora.evaluation.report import write_report
from store import AdapterStore


def test_squad_metrics():
    assert normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the Port Anselm.", "Port Anselm") == 1.0
    assert exact_match("Port", "Port Anselm") == 0.0
    assert f1("Port Anselm town", "Port Anselm") == pytest.approx(0.8)
    assert f1("Krell", "Port Anselm") == 0.0
    assert contains("It is Port Anselm, a town", "port anselm") == 1.0
    assert contains("Portland", "Port") == 0.0  # whole words only
    assert starts_with("Martian cycle, which", "Martian cycle") == 1.0
    assert starts_with("the Martian", "Martian cycle") == 0.0


def test_dataset_splits_are_disjoint_and_sized(tmp_path):
    data = write_cpkc(tmp_path / "qa.jsonl", 330)  # tune: the last 100 (at most a third)
    tune = load_dataset(data, "cpkc", limit=60, distractors=40, split="tune")
    evaluation = load_dataset(data, "cpkc", limit=200, distractors=30, split="eval")
    assert len(tune.items) == 60 and len(tune.distractors) == 40 and len(tune.passages) == 100
    assert not set(tune.passages) & set(evaluation.passages)
    assert not {it.passage_id for it in tune.items} & set(tune.distractors)
    with pytest.raises(MicroloraError, match="not enough"):
        load_dataset(data, "cpkc", limit=201, distractors=30, split="eval")
    (tmp_path / "bad.jsonl").write_text('{"question": "no context"}\n')
    with pytest.raises(MicroloraError, match="not a cpkc dataset"):
        load_dataset(tmp_path / "bad.jsonl", "cpkc", limit=1)


def test_questions_about_one_document_are_one_passage_reported_by_kind(tmp_path):
    rows = [{"id": f"d{d}-q{q}", "question": f"question {q} about {d}?",
             "context": f"Document {d} says this. It says that too.", "answer": "this",
             "kind": ("pronoun", "bridge", "direct")[q]} for d in range(12) for q in range(3)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tune = load_dataset(tmp_path / "docs.jsonl", "cpkc", limit=4, split="tune")
    assert len(tune.passages) == 4 and len(tune.items) == 12  # a third of 12 documents
    assert {it.kind for it in tune.items} == {"pronoun", "bridge", "direct"}
    assert all(it.passage_id == it.id.split("-")[0] + "-q0" for it in tune.items)
    evaluation = load_dataset(tmp_path / "docs.jsonl", "cpkc", limit=8, split="eval")
    assert not set(tune.passages) & set(evaluation.passages)


def test_fictional_probes(tmp_path):
    rows = [{"train_context": f"Passage {i}.", **{f"{kind}_{part}": [f"{kind} {part} {j}"
                                                                      for j in range(5)]
                                                  for kind in ("mem", "gen", "hard_gen")
                                                  for part in ("input", "target")}}
            for i in range(35)]
    (tmp_path / "fk.json").write_text(json.dumps(rows))
    ds = load_dataset(tmp_path / "fk.json", "fictional", limit=2, distractors=1, split="eval")
    assert ds.template == "completion" and len(ds.items) == 30
    assert {it.kind for it in ds.items} == {"mem", "gen", "hard_gen"}


def test_a_whole_run_on_tiny_models(tmp_path, tiny_models):
    lm, emb_path = tiny_models
    base, emb = load_base_model(lm, dtype="fp32"), load_embedder(emb_path)
    data = write_cpkc(tmp_path / "qa.jsonl", 110)
    ds = load_dataset(data, "cpkc", limit=4, distractors=2, split="eval")
    config = EvalConfig(k=2, sweep=(1,), batch_size=3, max_new_tokens=3,
                        train=TrainConfig(max_steps=2, batch_atoms=8))
    seen = []
    summary, rows = run_eval(ds, tmp_path / "work", base, emb, config,
                             progress=lambda stage, d, t: seen.append(stage))
    assert set(summary["systems"]) == {"closed_book", "rag", "passage_rag", "parametric",
                                       "hybrid", "oracle"}
    assert summary["n"] == 4 and summary["passages"] == 6 and summary["distractors"] == 2
    assert summary["compile"]["atoms"] == summary["compile"]["trained"] > 6
    for stats in summary["systems"].values():
        assert {"em", "f1", "contains", "original_rate", "latency_s"} <= set(stats)
        assert all(0 <= stats[m] <= 1 for m in ("em", "f1", "contains"))
    assert set(summary["sweep"]) == {"1", "2"}
    assert 0 <= summary["recall_at_k"] <= 1
    # 6 systems at k=2, plus the 4 retrieving ones at k=1
    assert len(rows) == 4 * (6 + 4)
    assert {"compile", "answer"} <= set(seen)
    written = write_report(summary, rows, tmp_path / "out" / "result.json")
    assert [p.suffix for p in written] == [".json", ".jsonl", ".md", ".png"]
    report = (tmp_path / "out" / "result.md").read_text()
    assert "| parametric |" in report
    assert report.startswith("qa.jsonl: 4 questions")  # named by its file, not its format


def test_scores_count_the_right_answers(tmp_path, tiny_models, monkeypatch):
    """With answers we control (right, right in longer words, the real-world answer, wrong),
    every score is the share it must be, per question and in the summary."""
    from composer import Answer, Composer

    lm, emb_path = tiny_models
    base, emb = load_base_model(lm, dtype="fp32"), load_embedder(emb_path)
    ds = load_dataset(write_cpkc(tmp_path / "qa.jsonl", 110), "cpkc", limit=4, distractors=0)
    gold = {it.question: it.answer for it in ds.items}
    ways = [lambda a: a, lambda a: f"it is {a} today", lambda a: "w99", lambda a: "nothing"]
    order = {it.question: i for i, it in enumerate(ds.items)}

    def answer(self, questions, namespaces=None, config=None, **kw):
        return [Answer(q, ways[order[q]](gold[q]), config.mode) for q in questions]

    monkeypatch.setattr(Composer, "ask_batch", answer)
    summary, rows = run_eval(ds, tmp_path / "work", base, emb, EvalConfig(
        k=1, systems=("rag",), train=TrainConfig(max_steps=1)))
    stats = summary["systems"]["rag"]
    assert (stats["em"], stats["contains"], stats["original_rate"]) == (0.25, 0.5, 0.25)
    assert stats["f1"] == pytest.approx((1 + 2 / 5) / 4, abs=1e-4)  # "it is X today": 2/5
    assert [r["em"] for r in rows] == [1.0, 0.0, 0.0, 0.0]
    assert [r["contains"] for r in rows] == [1.0, 1.0, 0.0, 0.0]


def test_oracle_composes_the_gold_passage_atoms(tmp_path, tiny_models, monkeypatch):
    from composer import Composer

    lm, emb_path = tiny_models
    base, emb = load_base_model(lm, dtype="fp32"), load_embedder(emb_path)
    ds = load_dataset(write_cpkc(tmp_path / "qa.jsonl", 110), "cpkc", limit=2, distractors=3)
    used = []
    original = Composer.ask_batch

    def spy(self, questions, namespaces=None, config=None, **kw):
        used.append((config.mode.value, kw.get("hits")))
        return original(self, questions, namespaces, config, **kw)

    monkeypatch.setattr(Composer, "ask_batch", spy)
    run_eval(ds, tmp_path / "work", base, emb, EvalConfig(
        k=1, systems=("oracle",), max_new_tokens=2, train=TrainConfig(max_steps=1)))
    (mode, hits), = used
    assert mode == "parametric"
    with AdapterStore(tmp_path / "work" / "store", readonly=True) as s:
        for row, item in zip(hits, ds.items):
            assert len(row) == 2  # the gold passage has two sentences: two atoms
            texts = {r.text for r in s.get("eval", [h.id for h in row])}
            assert all(t.rstrip(".") in ds.passages[item.passage_id] for t in texts)


def test_cli_eval(tmp_path, tiny_models):
    lm, emb = tiny_models
    data = write_cpkc(tmp_path / "qa.jsonl", 110)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(cli, [
        "eval", "--data", str(data), "--limit", "2", "--distractors", "1", "-k", "1",
        "--systems", "closed_book,parametric", "--steps", "1", "--out", str(out),
        "--base-model", str(lm), "--embedder", str(emb)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert set(summary["systems"]) == {"closed_book", "parametric"}
    assert summary["split"] == "eval" and summary["config"]["train"]["max_steps"] == 1
    bad = CliRunner().invoke(cli, ["eval", "--data", str(data), "--systems", "magic",
                                   "--out", str(out)])
    assert bad.exit_code == 2 and "choose from" in bad.output
