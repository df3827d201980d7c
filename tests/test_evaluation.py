"""The QA harness: metrics, dataset splits, and a whole run on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

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


def write_cpkc(path, n):
    rows = [{"id": f"q{i}", "question": f"w{i} w{i + 1}", "context": f"w{i} w{i + 1} w{i + 2} "
             f"w{i + 3} w{i + 4} w{i + 5} w{i + 6} w{i + 7} w{i + 8}. w9{i % 10} w{i} w50 w51 "
             "w52 w53 w54 w55 w56 w57.", "answer": f"w{i + 2}", "original_answer": "w99"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dataset_splits_are_disjoint_and_sized(tmp_path):
    data = write_cpkc(tmp_path / "qa.jsonl", 130)
    tune = load_dataset(data, "cpkc", limit=60, distractors=40, split="tune")
    evaluation = load_dataset(data, "cpkc", limit=20, distractors=10, split="eval")
    assert len(tune.items) == 60 and len(tune.distractors) == 40 and len(tune.passages) == 100
    assert not set(tune.passages) & set(evaluation.passages)
    assert not {it.passage_id for it in tune.items} & set(tune.distractors)
    with pytest.raises(MicroloraError, match="not enough"):
        load_dataset(data, "cpkc", limit=25, distractors=10, split="eval")
    (tmp_path / "bad.jsonl").write_text('{"question": "no context"}\n')
    with pytest.raises(MicroloraError, match="not a cpkc dataset"):
        load_dataset(tmp_path / "bad.jsonl", "cpkc", limit=1)


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
    base, emb = load_base_model(lm), load_embedder(emb_path)
    data = write_cpkc(tmp_path / "qa.jsonl", 110)
    ds = load_dataset(data, "cpkc", limit=4, distractors=2, split="eval")
    config = EvalConfig(k=2, sweep=(1,), batch_size=3, max_new_tokens=3,
                        train=TrainConfig(max_steps=2, batch_atoms=8))
    seen = []
    summary, rows = run_eval(ds, tmp_path / "work", base, emb, config,
                             progress=lambda stage, d, t: seen.append(stage))
    assert set(summary["systems"]) == {"closed_book", "rag", "parametric", "hybrid", "oracle"}
    assert summary["n"] == 4 and summary["passages"] == 6 and summary["distractors"] == 2
    assert summary["compile"]["atoms"] == summary["compile"]["trained"] > 6
    for stats in summary["systems"].values():
        assert {"em", "f1", "contains", "original_rate", "latency_s"} <= set(stats)
        assert all(0 <= stats[m] <= 1 for m in ("em", "f1", "contains"))
    assert set(summary["sweep"]) == {"1", "2"}
    assert 0 <= summary["recall_at_k"] <= 1
    # 5 systems at k=2, plus the 3 retrieving ones at k=1
    assert len(rows) == 4 * (5 + 3)
    assert {"compile", "answer"} <= set(seen)
    written = write_report(summary, rows, tmp_path / "out" / "result.json")
    assert [p.suffix for p in written] == [".json", ".jsonl", ".md", ".png"]
    assert "| parametric |" in (tmp_path / "out" / "result.md").read_text()


def test_oracle_composes_the_gold_passage_atoms(tmp_path, tiny_models, monkeypatch):
    from composer import Composer

    lm, emb_path = tiny_models
    base, emb = load_base_model(lm), load_embedder(emb_path)
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


def test_reader_trains_on_tune_installs_and_joins_eval(tmp_path, tiny_models):
    """`microlora reader train` on the tune split writes a reader; eval composes it; install
    puts it in a store, where the composer picks it up; another model's reader is refused."""
    from compiler.pipeline import store_header
    from composer import Composer
    from microlora.core.errors import AdapterError
    from store.peft import read_reader

    lm, emb_path = tiny_models
    data = write_cpkc(tmp_path / "qa.jsonl", 110)
    common = ["--base-model", str(lm), "--embedder", str(emb_path), "--last-layers", "2",
              "--steps", "2", "--max-atom-tokens", "16"]
    r = CliRunner().invoke(cli, ["reader", "train", "--data", str(data), "--limit", "6",
                                 "--out", str(tmp_path / "reader"), "--epochs", "2",
                                 "--reader-rank", "2", *common])
    assert r.exit_code == 0, r.output
    base, emb = load_base_model(lm), load_embedder(emb_path)
    adapter, info = read_reader(tmp_path / "reader", base.fingerprint)
    assert info["questions"] == 6 and adapter.rank == 2
    with pytest.raises(AdapterError, match="trained for base model"):
        read_reader(tmp_path / "reader", "another-model")
    ds = load_dataset(data, "cpkc", limit=3, distractors=1, split="eval")
    summary, _ = run_eval(ds, tmp_path / "ev", base, emb, EvalConfig(
        k=1, systems=("parametric",), max_new_tokens=2, reader=tmp_path / "reader",
        train=TrainConfig(max_steps=1)))
    assert summary["config"]["reader_info"]["questions"] == 6
    AdapterStore.create(tmp_path / "kb", store_header(base, emb)).close()
    r = CliRunner().invoke(cli, ["reader", "install", str(tmp_path / "reader"), "--store",
                                 str(tmp_path / "kb")])
    assert r.exit_code == 0, r.output
    with Composer(AdapterStore(tmp_path / "kb", readonly=True), base, emb) as composer:
        assert composer.reader.layout == adapter.layout
        assert torch.equal(composer.reader.flat, adapter.flat)
