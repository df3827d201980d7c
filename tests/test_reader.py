"""The reader: one shared adapter trained to answer from whatever atoms are composed beside
it; composed first in every request that uses adapters, never in the others."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from conftest import (
    last_logits,
    open_composer,
    random_adapter,
    random_atom_kit,
    with_deltas_added,
    write_cpkc,
)

from compiler.pipeline import store_header
from composer import Composer
from composer.generation import encode_prompts
from microlora.cli import cli
from microlora.core.config import AskConfig, TargetSpec, TrainConfig
from microlora.core.embedder import load_embedder
from microlora.core.models import load_base_model
from microlora.core.pack import Packed
from microlora.evaluation import EvalConfig, run_eval
from microlora.evaluation.datasets import load_dataset
from store import AdapterStore

CORPUS = {"wiki": [f"w{i} w{i + 1} w{i + 2} w{i + 3}" for i in range(0, 80, 10)]}


@pytest.fixture(scope="module")
def kit(tiny_models, tmp_path_factory):
    """(base model, embedder, store path) with random rank-2 atoms."""
    return random_atom_kit(tiny_models, tmp_path_factory.mktemp("reader"), CORPUS)


def test_a_reader_is_composed_beside_every_requests_atoms(kit):
    """With a reader set, request b's delta is reader + its own atoms (checked against the
    deltas added by hand); modes without adapters never see it."""
    base, emb, path = kit
    with open_composer(kit) as c:
        hits = c.retrieve(["w1 w2 w3"], ["wiki"], AskConfig(k=2))
        shapes = {n: (A.shape[2], B.shape[1]) for n, (A, B) in c.compose(hits).items()}
        reader = random_adapter(shapes, 3, seed=77, scale=0.4)
        atoms = [c.store.get("wiki", [h.id])[0].adapter.unpack() for h in hits[0]]
        c.use_reader(Packed.of(reader))
        ids, mask = encode_prompts(base.tokenizer, ["w5 w6 w7"], base.device)
        with c.lora.adapters(c.compose(hits)):
            ours = last_logits(base.model, ids, mask)
        none = c.ask("w1 w2 w3", ["wiki"], AskConfig(mode="none", max_new_tokens=4)).text
        c.use_reader(None)
        assert none == c.ask("w1 w2 w3", ["wiki"], AskConfig(mode="none", max_new_tokens=4)).text
    ref = with_deltas_added(base.model, [reader] + [{n: (A.float(), B.float())
                                                     for n, (A, B) in a.items()} for a in atoms])
    torch.testing.assert_close(ours, last_logits(ref, ids, mask), atol=1e-4, rtol=1e-4)


def test_the_reader_joins_requests_with_weighted_atoms_only(kit):
    """Hybrid's passage row composes its atoms at weight 0: it gets no reader either (the
    reader reads atoms; beside none it only pulls answers away from the passage), so that
    row is exactly the base model, while the atom row carries reader + atoms."""
    base, emb, path = kit
    with open_composer(kit) as c:
        hits = c.retrieve(["w1 w2 w3"], ["wiki"], AskConfig(k=1))[0]
        shapes = {n: (A.shape[2], B.shape[1]) for n, (A, B) in c.compose([hits]).items()}
        c.use_reader(Packed.of(random_adapter(shapes, 3, seed=77, scale=0.4)))
        silent = [replace(h, weight=0.0) for h in hits]
        ids, mask = encode_prompts(base.tokenizer, ["w5 w6 w7"] * 2, base.device)
        plain = last_logits(base.model, ids, mask)
        with c.lora.adapters(c.compose([hits, silent])):
            both = last_logits(base.model, ids, mask)
        with c.lora.adapters(c.compose([hits, hits])):
            atoms_twice = last_logits(base.model, ids, mask)
    torch.testing.assert_close(both[1], plain[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[0], atoms_twice[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both[0], plain[0], atol=1e-3)


def test_reader_training_lowers_the_answer_loss(tiny_models):
    from compiler.reader import ReaderExample, train_reader
    from microlora.core.config import ReaderConfig

    base = load_base_model(tiny_models[0], dtype="fp32")
    examples = [ReaderExample(f"w{i} w{i + 1} w{i + 2}", f" w{100 + i}\n", []) for i in range(6)]
    config = ReaderConfig(rank=4, lr=2e-2, epochs=8, batch=3, targets=TargetSpec(last_layers=2))
    losses = []
    reader = train_reader(base, examples, config, progress=lambda _s, _n, loss: losses.append(loss))
    assert len(losses) == 16 and losses[-1] < 0.7 * losses[0]
    assert all(B.abs().max() > 0 for _, B in reader.unpack().values())
    assert not any(type(m).__name__ == "MultiLoraLinear" for m in base.model.modules())


def test_reader_trains_on_tune_installs_and_joins_eval(tmp_path, tiny_models):
    """`microlora reader train` on the tune split writes a reader; eval composes it; install
    puts it in a store, where the composer picks it up; another model's reader is refused."""
    from microlora.core.errors import AdapterError
    from store.peft import read_reader

    lm, emb_path = tiny_models
    data = write_cpkc(tmp_path / "qa.jsonl", 110)
    common = ["--base-model", str(lm), "--embedder", str(emb_path), "--last-layers", "2",
              "--steps", "2", "--max-atom-tokens", "16"]
    r = CliRunner().invoke(cli, ["reader", "train", "--data", str(data), "--split", "tune",
                                 "--limit", "6", "--all-questions",
                                 "--out", str(tmp_path / "reader"), "--epochs", "2",
                                 "--reader-rank", "2", *common])
    assert r.exit_code == 0, r.output
    base, emb = load_base_model(lm, dtype="fp32"), load_embedder(emb_path)
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


def test_without_data_the_reader_trains_on_invented_documents(tmp_path, tiny_models):
    """The default training data is the project's own invented documents, never a benchmark:
    every question of the requested documents is asked, and the reader records where its
    questions came from."""
    from microlora.evaluation.invented import invent_rows
    from store.peft import read_reader

    lm, emb_path = tiny_models
    r = CliRunner().invoke(cli, ["reader", "train", "--documents", "2", "--epochs", "1",
                                 "--all-questions",
                                 "--reader-rank", "2", "--out", str(tmp_path / "reader"),
                                 "--base-model", str(lm), "--embedder", str(emb_path),
                                 "--last-layers", "2", "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert "2 invented documents" in r.output
    _, info = read_reader(tmp_path / "reader", load_base_model(lm, dtype="fp32").fingerprint)
    assert info["questions"] == len(invent_rows(2)) and info["dataset"] == "invented.jsonl"


def test_answerable_only_trains_on_questions_whose_atoms_hold_the_answer(tmp_path, tiny_models):
    """A question whose retrieved atoms do not say its answer is left out (it would teach the
    reader to guess); when that leaves nothing, the error says so and how to go on."""
    import json

    lm, emb_path = tiny_models
    data = write_cpkc(tmp_path / "qa.jsonl", 8)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    absent = tmp_path / "absent.jsonl"
    absent.write_text("".join(json.dumps({**r, "answer": "w999"}) + "\n" for r in rows))
    common = ["--split", "all", "--epochs", "1", "--reader-rank", "2", "--base-model", str(lm),
              "--embedder", str(emb_path), "--last-layers", "2", "--steps", "2"]
    r = CliRunner().invoke(cli, ["reader", "train", "--data", str(absent), "--answerable-only",
                                 "--out", str(tmp_path / "none"), *common])
    assert r.exit_code != 0 and "--all-questions" in r.output
    r = CliRunner().invoke(cli, ["reader", "train", "--data", str(absent), "--all-questions",
                                 "--out", str(tmp_path / "all"), *common])
    assert r.exit_code == 0, r.output
