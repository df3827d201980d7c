"""End-to-end checks on the real default base model (Gemma 3 270M) and embedder.

The first run converts the packaged GGUF (about a minute); set MICROLORA_TEST_MODEL_HOME to a
cache dir (e.g. ~/.cache/microlora) to reuse a conversion across runs.
"""

import json
import os

import pytest
import torch

from microlora.core.config import TargetSpec
from microlora.core.embedder import load_embedder
from microlora.core.kernel import MultiLoraModel
from microlora.core.models import default_model_dir, load_base_model
from microlora.core.pack import Packed, compose
from microlora.core.paths import HOME_ENV
from microlora.core.runtime import bf16_is_fast

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    home = os.environ.get("MICROLORA_TEST_MODEL_HOME") or tmp_path_factory.mktemp("model-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HOME_ENV, str(home))
        base = load_base_model(dtype="fp32")  # the tests below compare numerics
        marker = default_model_dir() / "microlora-converted.json"
        yield base, marker


def test_default_model_converts_once_and_reloads_identically(gemma):
    base, marker = gemma
    assert json.loads(marker.read_text())["fingerprint"] == base.fingerprint
    stamp = marker.stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HOME_ENV, str(marker.parent.parent.parent))
        again = load_base_model()  # the default: bf16 where bf16 is fast, else fp32
    assert marker.stat().st_mtime_ns == stamp  # not converted a second time
    assert again.fingerprint == base.fingerprint
    assert again.base_dtype == ("bf16" if bf16_is_fast(torch.device("cpu")) else "fp32")
    # fp32 blocks, the 262k-token vocabulary (63 % of the weights) in bf16: 703 MB, not 1,023
    assert base.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.dtype == torch.float32 and base.weight_bytes < 750 * 2**20
    assert not list(marker.parent.parent.glob("*.tmp-*"))
    for prompt, want in [("Question: What is the capital of France?\nAnswer:", "Paris"),
                         ("One, two, three, four,", "five")]:
        ids = base.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            top = base.model(input_ids=ids).logits[0, -1].argmax()
        assert base.tokenizer.decode(top).strip() == want  # the dequantised weights work


def test_fast_default_tokenizer_matches_transformers(gemma):
    from transformers import AutoTokenizer

    base, marker = gemma
    reference = AutoTokenizer.from_pretrained(marker.parent)
    texts = ["Madge Blake (1899-1969) was born in Kinsley, Kansas.", "naïve café — 東京 🙂",
             "Question: What is 2+2?\nAnswer: 4<eos>", "  spaces\tand\nnewlines  "]
    for text in texts:
        assert base.tokenizer(text).input_ids == reference(text).input_ids
        assert base.tokenizer.decode(base.tokenizer(text).input_ids) == reference.decode(
            reference(text).input_ids)
    for attr in ["bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"]:
        assert getattr(base.tokenizer, attr) == getattr(reference, attr)


def test_adapters_on_default_targets(gemma):
    base, _ = gemma
    model = base.model
    ids = base.tokenizer("Madge Blake was born in", return_tensors="pt").input_ids

    def states():  # the blocks' fp32 output: the bf16 output layer would round it first
        return model.base_model(input_ids=ids).last_hidden_state

    with torch.no_grad():
        plain = states()
    lora = MultiLoraModel(model, TargetSpec())
    try:
        shapes = lora.shapes()
        assert sorted({int(n.split(".")[2]) for n in shapes}) == list(range(12, 18))
        assert len(shapes) == 18
        g = torch.Generator().manual_seed(0)
        atoms = [{n: (torch.randn(2, i, generator=g) * 0.05, torch.randn(o, 2, generator=g) * 0.05)
                  for n, (i, o) in shapes.items()} for _ in range(3)]
        with torch.no_grad():
            with lora.adapters({}):
                assert torch.equal(states(), plain)
            composed = compose([[Packed.of(a) for a in atoms]])
            with lora.adapters(composed):
                stacked = states()
            with lora.merged(composed):
                merged = states()
        assert (stacked - plain).abs().max() > 0.1
        torch.testing.assert_close(stacked, merged, atol=2e-3, rtol=1e-4)
    finally:
        lora.remove()
    with torch.no_grad():
        assert torch.equal(states(), plain)


def test_default_embedder_ranks_paraphrases_first():
    emb = load_embedder()
    vecs = emb.encode(["The cat sat on the mat.", "A cat was sitting on a mat.",
                       "Stock markets fell sharply on Monday."])
    assert vecs.shape == (3, emb.dim) == (3, 384)
    sims = vecs @ vecs[0]
    assert sims[1] > 0.7 > sims[2]


def test_compile_real_sentences_with_the_default_models(gemma, tmp_path):
    from compiler.pipeline import compile_corpus
    from microlora.core.config import TrainConfig
    from store import AdapterStore

    base, _ = gemma
    doc = tmp_path / "facts.txt"
    doc.write_text("The Zorblat river flows north into Lake Quenby near the town of Ostrel. "
                   "Madge Blake was born in Kinsley, Kansas, in 1899, to a family of farmers.")
    report = compile_corpus([doc], tmp_path / "s", base=base, embedder=load_embedder(),
                            train_config=TrainConfig(max_steps=10))
    assert (report.atoms, report.trained) == (2, 2)
    with AdapterStore(tmp_path / "s", readonly=True) as s:
        assert s.verify().ok and s.header.base_fingerprint == base.fingerprint
        for record in s.get("default", s.ids("default")):
            ids = base.tokenizer(record.text, return_tensors="pt").input_ids
            with torch.no_grad():
                untrained = base.model(input_ids=ids, labels=ids).loss.item()
            assert len(record.adapter.modules) == 18
            assert record.extra["final_loss"] < 0.5 * untrained  # it learned its sentence


def test_readme_quickstart_sample_is_what_a_fresh_run_prints(gemma):
    """README's first command on the real models, run fresh by the script that writes the
    README's sample (scripts/readme_quickstart.py): the two agree but for measured seconds,
    the packaged invented facts are unknown to the base model closed book and the composed
    adapters answer some of them; a second run trains nothing. It runs in the base dtype the
    sample names ("auto" picks bf16 or fp32 by the machine's matmuls)."""
    import importlib.util
    import re
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from microlora.cli import cli

    path = Path(__file__).resolve().parent.parent / "scripts" / "readme_quickstart.py"
    spec = importlib.util.spec_from_file_location("readme_quickstart", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up while defined
    spec.loader.exec_module(script)
    _, marker = gemma
    home = marker.parent.parent.parent
    run = script.run_quickstart(home, script.sample_dtype())  # the dtype the sample ran in
    assert script.disagreement(run) == [], "\n".join(
        script.disagreement(run) + ["run python scripts/readme_quickstart.py to rewrite it"])
    closed, adapters = map(int, re.search(
        r"closed book (\d+)/6, .* adapters (\d+)/6", run.stdout).groups())
    assert adapters > closed
    again = CliRunner().invoke(cli, ["--home", str(home), "quickstart"])
    assert "(already compiled)" in again.stdout  # a second run trains nothing


def test_a_pdf_question_answered_on_page_2_is_explained_with_its_page(gemma, tmp_path):
    """A PDF compiled with the real models: the question's atom is retrieved from page 2 of
    report.pdf, and ``ask --explain`` says so ("report.pdf:...  p. 2, Results")."""
    from pathlib import Path

    from click.testing import CliRunner

    from microlora.cli import cli

    _, marker = gemma
    home = marker.parent.parent.parent
    pdf = Path(__file__).parent / "data" / "report.pdf"
    store = tmp_path / "kb"
    done = CliRunner().invoke(cli, ["--home", str(home), "compile", str(pdf), "--store",
                                    str(store)])
    assert done.exit_code == 0 and "1 documents, 10 atoms: 10 trained" in done.output, \
        done.output
    asked = CliRunner().invoke(cli, ["--home", str(home), "ask", "Which cathedral was the "
                                     "largest clock of the year built for?", "--store",
                                     str(store), "--explain"])
    assert asked.exit_code == 0, asked.output
    top = next(line for line in asked.output.splitlines() if line.strip().startswith("1."))
    assert "report.pdf:" in top and "p. 2, Results" in top and "Velmora" in top, asked.output
