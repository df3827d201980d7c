"""The compile pipeline end to end on tiny models: incremental, prune, dry run, bad inputs,
identity checks, and a compile killed with SIGKILL that resumes."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from compiler.pipeline import compile_corpus
from microlora.cli import cli
from microlora.core.config import ChunkConfig, TargetSpec, TrainConfig
from microlora.core.embedder import load_embedder
from microlora.core.errors import StoreMismatchError
from microlora.core.models import load_base_model
from store import AdapterStore
from store.record import stored_dtype

RECIPE = TrainConfig(targets=TargetSpec(last_layers=2), max_steps=3, lr=2e-2, bf16=False,
                     batch_atoms=4, neighbours=1)
DOC_A = ("w1 w2 w3 w4 w5 w6 w7 w8. w9 w10 w11 w12 w13 w14 w15.\n\n"
         "w16 w17 w18 w19 w20 w21 w22. w23 w24 w25 w26 w27 w28 w29.")
DOC_B = "w30 w31 w32 w33 w34 w35 w36. w37 w38 w39 w40 w41 w42 w43."
CHUNK = ChunkConfig(max_tokens=16, min_chars=10)


@pytest.fixture(scope="module")
def models(tiny_models):
    lm, emb = tiny_models
    return load_base_model(lm, dtype="fp32"), load_embedder(emb)


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text(DOC_A)
    (d / "b.md").write_text(DOC_B)
    return d


def run(paths, store, models, **kw):
    base, emb = models
    return compile_corpus(paths, store, base=base, embedder=emb, namespace="docs",
                          train_config=kw.pop("train_config", RECIPE), chunk_config=CHUNK, **kw)


def test_compile_writes_verified_atoms_with_provenance(tmp_path, corpus, models):
    report = run([corpus], tmp_path / "s", models)
    assert (report.documents, report.atoms, report.trained) == (2, 6, 6)
    assert report.atom_steps > 0 and report.problems == []
    with AdapterStore(tmp_path / "s", readonly=True) as s:
        assert s.verify().ok and s.count("docs") == 6
        with s.read("docs") as reader:
            for _, r in reader.items():
                doc = (corpus / ("a.txt" if r.source.endswith("a.txt") else "b.md")).read_text()
                assert doc[r.start:r.end] == r.text
                assert r.extra["steps"] <= RECIPE.max_steps and r.config["rank"] == RECIPE.rank
        query = models[1].encode(["w30 w31 w32 w33 w34 w35 w36."])
        top = s.search("docs", query, k=1)[0][0][0]
        assert s.get("docs", [top])[0].text == "w30 w31 w32 w33 w34 w35 w36."


def test_recompiling_is_free_and_edits_retrain_only_what_changed(tmp_path, corpus, models):
    run([corpus], tmp_path / "s", models)
    again = run([corpus], tmp_path / "s", models)
    assert (again.trained, again.already_compiled) == (0, 6)
    (corpus / "a.txt").write_text(DOC_A.replace("w24 w25", "w24 w99 w25"))
    edited = run([corpus], tmp_path / "s", models)
    assert (edited.trained, edited.already_compiled, edited.pruned) == (1, 5, 0)
    pruned = run([corpus], tmp_path / "s", models, prune=True)
    assert (pruned.trained, pruned.pruned) == (0, 1)
    (corpus / "b.md").unlink()
    gone = run([corpus], tmp_path / "s", models, prune=True)
    assert gone.pruned == 2
    with AdapterStore(tmp_path / "s", readonly=True) as s:
        assert s.count("docs") == 4 and s.verify().ok


def test_dry_run_plans_without_writing(tmp_path, corpus, models):
    report = run([corpus], tmp_path / "s", models, dry_run=True)
    assert report.trained == 0 and len(report.planned) == 6 and report.estimated_seconds > 0
    assert not (tmp_path / "s").exists()


def test_bad_inputs_are_reported_and_the_rest_compiles(tmp_path, corpus, models):
    (corpus / "empty.txt").write_text("")
    (corpus / "blob.txt").write_bytes(b"\x00\xff" * 10)
    report = run([corpus, tmp_path / "missing.md"], tmp_path / "s", models)
    assert report.trained == 6
    assert sorted(p.reason.split(" ")[0] for p in report.problems) == ["binary", "empty", "no"]


def test_compiling_with_another_base_model_is_refused_and_writes_nothing(tmp_path, corpus, models,
                                                                       tiny_models):
    run([corpus], tmp_path / "s", models)
    before = sorted((tmp_path / "s").rglob("*"))
    other = load_base_model(tiny_models[0].parent / "lm", dtype="bf16")  # same model: fine
    assert other.fingerprint == models[0].fingerprint
    from conftest import save_tiny

    stranger = load_base_model(save_tiny(tmp_path / "other", "gemma", seed=7))
    with pytest.raises(StoreMismatchError, match="--base-model"):
        compile_corpus([corpus], tmp_path / "s", base=stranger, embedder=models[1],
                       namespace="docs", train_config=RECIPE, chunk_config=CHUNK)
    assert sorted((tmp_path / "s").rglob("*")) == before


def test_cli_compile_and_dry_run(tmp_path, corpus, tiny_models):
    lm, emb = tiny_models
    args = ["compile", str(corpus), "--store", str(tmp_path / "s"), "--base-model", str(lm),
            "--embedder", str(emb), "--last-layers", "2", "--steps", "2",
            "--max-atom-tokens", "16"]
    dry = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "2 documents, 4 atoms: 0 already compiled, 4 to train" in dry.output  # CLI min_chars 30
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert "4 trained" in done.output and "[default]" in done.output
    again = CliRunner().invoke(cli, args)  # every atom is stored: nothing is trained
    assert again.exit_code == 0, again.output
    assert "nothing to train, 4 already compiled" in again.output
    assert "nan" not in again.output and "atoms/s" not in again.output
    nothing = CliRunner().invoke(cli, [*args[:1], str(tmp_path / "nope"), "--store",
                                       str(tmp_path / "s2"), *args[4:]])
    assert nothing.exit_code == 1
    assert "no such file or directory" in nothing.output and "nothing to compile" in nothing.output
    assert not (tmp_path / "s2").exists()
    bad = CliRunner().invoke(cli, [*args, "--rank", "3"])
    assert bad.exit_code == 2 and "--rank" in bad.output
    # each compiled file is a document that can be forgotten on its own
    with AdapterStore(tmp_path / "s", readonly=True) as s:
        docs = s.documents("default")
    a_txt = next(d for d in docs if d.endswith("a.txt"))
    forgot = CliRunner().invoke(cli, ["store", "rm", "default", "--document", a_txt, "-y",
                                      "--store", str(tmp_path / "s")])
    assert forgot.exit_code == 0 and f"forgot {a_txt} ({len(docs[a_txt])} atoms)" in forgot.output
    with AdapterStore(tmp_path / "s", readonly=True) as s:
        assert set(s.documents("default")) == set(docs) - {a_txt}
        assert sorted(s.ids("default")) == sorted(i for d, ids in docs.items() if d != a_txt
                                                  for i in ids)
    # adapters are stored as int8 unless told otherwise
    bf16 = CliRunner().invoke(cli, [*args[:2], "--store", str(tmp_path / "s3"), *args[4:],
                                    "--adapter-dtype", "bf16"])
    assert bf16.exit_code == 0, bf16.output
    for path, kind in ((tmp_path / "s", "int8"), (tmp_path / "s3", "bf16")):
        with AdapterStore(path, readonly=True) as s, s.read("default") as reader:
            assert {stored_dtype(reader._value(i)) for i in s.ids("default")} == {kind}


def test_sigkill_mid_compile_leaves_a_clean_store_that_resumes(tmp_path, tiny_models):
    lm, emb = tiny_models
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):  # 24 atoms, one per batch: plenty of commits to interrupt
        words = [f"w{(7 * i + j) % 120}" for j in range(20)]  # sentences over min_chars
        (docs / f"d{i:02d}.txt").write_text(" ".join(words[:10]) + ". " + " ".join(words[10:]) +
                                            ".")
    cmd = [sys.executable, "-m", "microlora", "compile", str(docs), "--store",
           str(tmp_path / "s"), "--base-model", str(lm), "--embedder", str(emb),
           "--last-layers", "2", "--steps", "3", "--batch-size", "1", "--max-atom-tokens", "16"]
    env = {**os.environ, "MICROLORA_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    committed = 0
    while time.monotonic() < deadline and proc.poll() is None and committed < 3:
        time.sleep(0.05)  # polling for a condition, not a timing assertion
        if (tmp_path / "s" / "data.mdb").exists():
            try:
                with AdapterStore(tmp_path / "s", readonly=True) as s:
                    committed = s.count("default") if "default" in s.namespaces() else 0
            except Exception:  # the header may not be written yet
                committed = 0
    assert proc.poll() is None, "the compile finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with AdapterStore(tmp_path / "s", readonly=True) as s:
        partial = s.count("default")
        assert 3 <= partial < 24 and s.verify().ok
        stored, manifests = set(s.ids("default")), s.documents("default")
    # every stored atom is in the manifest of its document (written in the same transaction),
    # and a manifest is there only for a document with a stored atom: whatever was stored
    # can be forgotten by its document, before any rerun
    assert stored == {i for ids in manifests.values() for i in ids} & stored
    assert all(stored & set(ids) for ids in manifests.values())
    assert set(manifests) <= {f"d{i:02d}.txt" for i in range(12)}
    shutil.copytree(tmp_path / "s", tmp_path / "copy")
    doc, ids = next(iter(manifests.items()))
    forgot = CliRunner().invoke(cli, ["store", "rm", "default", "--document", doc, "-y",
                                      "--store", str(tmp_path / "copy")])
    assert forgot.exit_code == 0, forgot.output
    with AdapterStore(tmp_path / "copy", readonly=True) as s:
        assert set(s.ids("default")) == stored - set(ids) and s.verify().ok
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{24 - partial} trained" in resumed.stdout
    assert f"{partial} already compiled" in resumed.stdout
    with AdapterStore(tmp_path / "s", readonly=True) as s:
        assert s.count("default") == 24 and s.verify().ok
        assert len(s.index("default").ids) == 24  # the stale index was rebuilt
        assert sorted(i for ids in s.documents("default").values() for i in ids) == \
            sorted(s.ids("default"))


def test_torchrun_on_two_processes_trains_what_one_process_trains(tmp_path, corpus,
                                                                   tiny_models):
    """2 CPU processes (gloo) and 1 process compile the same corpus over the same earlier
    atoms: the same atom ids, equal adapters, and the shards merged away."""
    lm, emb = tiny_models
    common = ["-m", "microlora", "compile", "--base-model", str(lm), "--embedder", str(emb),
              "--last-layers", "2", "--steps", "3", "--max-atom-tokens", "16",
              "--batch-size", "2", "--neighbours", "1", "--lr", "0.02"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same arithmetic in every process

    def run_compile(launcher: list[str], paths: list[str], store) -> str:
        done = subprocess.run([sys.executable, *launcher, *common[:3], *paths, "--store",
                               str(store), *common[3:]], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for store in ("one", "two"):  # the same earlier atoms: stored neighbours come into play
        run_compile([], [str(corpus / "b.md")], tmp_path / store)
    single = run_compile([], [str(corpus)], tmp_path / "one")
    out = run_compile(torchrun, [str(corpus)], tmp_path / "two")

    def counts(text: str) -> tuple[str, ...]:  # "4 atoms: 3 trained (...), 1 already compiled"
        return re.search(r"(\d+) atoms: (\d+) trained .*, (\d+) already compiled", text).groups()

    assert counts(out) == counts(single) and counts(out)[1] != "0"
    assert not (tmp_path / "two" / "shards").exists()
    with AdapterStore(tmp_path / "one", readonly=True) as one, \
            AdapterStore(tmp_path / "two", readonly=True) as two:
        assert sorted(one.ids("default")) == sorted(two.ids("default"))
        assert one.documents("default") == two.documents("default")
        assert two.stats()[0].index == "exact"  # rebuilt after the merge
        for atom_id in one.ids("default"):
            a, b = one.get("default", [atom_id])[0], two.get("default", [atom_id])[0]
            assert a.adapter.layout == b.adapter.layout
            assert torch.equal(a.adapter.flat, b.adapter.flat)


def test_a_trained_adapter_with_nan_is_an_error_naming_the_atom(tmp_path, corpus, models,
                                                                 monkeypatch):
    from compiler.trainer import AtomTrainer
    from microlora.core.errors import StoreError

    train = AtomTrainer.train

    def diverged(self, texts, ids, **kw):  # as if training of the batch's 2nd atom blew up
        trained = train(self, texts, ids, **kw)
        trained[1].adapter.flat[0] = float("nan")
        return trained

    monkeypatch.setattr(AtomTrainer, "train", diverged)
    (tmp_path / "one.txt").write_text(DOC_B)
    with pytest.raises(StoreError, match=r"atom \w+ \(.*one.txt: 'w37 w38.*'\) has NaN or inf "
                                         "values in its adapter"):
        run([tmp_path / "one.txt"], tmp_path / "s", models)
    with AdapterStore(tmp_path / "s", readonly=True) as s:
        assert "docs" not in s.namespaces() or s.count("docs") == 0


def test_one_corpus_compiled_by_relative_and_absolute_paths_is_one_set_of_documents(
        tmp_path, corpus, models, monkeypatch):
    """Document ids are paths relative to the directory compiled: compiling it again by
    another path changes no manifest, and `store rm --document` forgets all of the text."""
    monkeypatch.chdir(tmp_path)
    run(["docs"], "s", models)
    again = run([corpus.resolve()], tmp_path / "s", models)
    assert again.trained == 0
    with AdapterStore(tmp_path / "s", readonly=True) as s:
        docs = s.documents("docs")
    assert {d: len(ids) for d, ids in docs.items()} == {"a.txt": 4, "b.md": 2}
    listed = CliRunner().invoke(cli, ["store", "docs", "docs", "--store", "s"])
    assert listed.exit_code == 0 and listed.output == "a.txt\t4 atoms\nb.md\t2 atoms\n"
    wrong = CliRunner().invoke(cli, ["store", "rm", "docs", "--document", str(corpus / "a.txt"),
                                     "-y", "--store", "s"])
    assert wrong.exit_code == 1 and "did you mean 'a.txt'?" in wrong.output
    forgot = CliRunner().invoke(cli, ["store", "rm", "docs", "--document", "a.txt", "-y",
                                      "--store", "s"])
    assert forgot.exit_code == 0 and "forgot a.txt (4 atoms)" in forgot.output
    with AdapterStore(tmp_path / "s", readonly=True) as s:
        assert sorted(s.ids("docs")) == sorted(docs["b.md"])
        assert list(s.documents("docs")) == ["b.md"]


def test_two_files_with_one_document_id_are_refused_by_name(tmp_path, corpus, models):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.md").write_text(DOC_A)
    report = run([corpus / "b.md", tmp_path / "other" / "b.md", corpus / "b.md"],
                 tmp_path / "s", models)
    assert (report.documents, report.trained) == (1, 2)
    assert [p.source for p in report.problems] == [str(tmp_path / "other" / "b.md")]
    assert "document id 'b.md' is already that of" in report.problems[0].reason


def test_a_document_id_over_the_key_limit_is_refused_before_training(tmp_path, models):
    long_id = "x" * 300  # with the file name, past LMDB's 511-byte key once namespaced
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"id": long_id * 2, "text": DOC_B}) + "\n" +
        json.dumps({"id": "ok", "text": DOC_A}) + "\n")
    report = run([tmp_path / "rows.jsonl"], tmp_path / "s", models)
    assert report.trained == 4 and len(report.problems) == 1
    assert "must be 1-256 bytes" in report.problems[0].reason
    with AdapterStore(tmp_path / "s", readonly=True) as s:
        assert list(s.documents("docs")) == ["rows.jsonl#ok"]


def test_an_atom_is_retrieved_by_its_sentence_with_its_paragraphs_subject(tmp_path, models):
    import numpy as np

    (tmp_path / "bio.md").write_text("Talia Orven grew up in Lisk. In 1891 she opened a "
                                     "furnace in Carrow.")
    run([tmp_path / "bio.md"], tmp_path / "s", models)
    with AdapterStore(tmp_path / "s", readonly=True) as s, s.read("docs") as reader:
        stored = {r.text: np.array(r.embedding) for _, r in reader.items()}  # off the map
    furnace = "In 1891 she opened a furnace in Carrow."
    assert set(stored) == {"Talia Orven grew up in Lisk.", furnace}  # the text is the original
    expected = models[1].encode([f"Talia Orven: {furnace}"])[0]
    assert np.allclose(stored[furnace], expected, atol=1e-6)
    assert not np.allclose(stored[furnace], models[1].encode([furnace])[0], atol=1e-3)


def test_batches_are_even_so_no_short_last_batch_trains_atoms_in_fixed_company():
    from compiler.pipeline import batches

    assert [len(b) for b in batches(list(range(20)), 16)] == [10, 10]
    assert [len(b) for b in batches(list(range(33)), 16)] == [11, 11, 11]
    assert [len(b) for b in batches(list(range(32)), 16)] == [16, 16]
    assert [len(b) for b in batches(list(range(5)), 16)] == [5]
    assert batches([], 16) == []
    split = batches(list(range(153)), 16)
    assert [x for b in split for x in b] == list(range(153)) and max(map(len, split)) <= 16
