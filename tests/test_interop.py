"""PEFT interop on tiny models: a composed adapter exported to PEFT's format gives PEFT the
same logits as microlora's composition; a LoRA made by PEFT imports as an atom that composes
to PEFT's own outputs; adapters that do not fit are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny, store_of_random_atoms

from compiler.peft_import import import_peft
from composer import Composer, Hit
from composer.export import export_peft, hits_for_atoms
from microlora.cli import cli
from microlora.core.embedder import load_embedder
from microlora.core.errors import AdapterError, MicroloraError
from microlora.core.models import load_base_model
from store import AdapterStore
from store.peft import read_peft, write_peft

peft = pytest.importorskip("peft")
TEXTS = ["w1 w2 w3 w4", "w10 w11 w12", "w20 w21 w22 w23", "w30 w31"]


def make_store(path, base, emb):
    return store_of_random_atoms(path, base, emb, {"wiki": TEXTS}, scale=0.3)


def logits(model, tok, text="w1 w2 w3 w5 w8"):
    batch = tok([text], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D, fan_in_fan_out
def test_exported_adapter_gives_peft_the_same_logits(tmp_path, tiny_models, arch):
    lm = save_tiny(tmp_path / arch, arch)
    _, emb_path = tiny_models
    base, emb = load_base_model(lm, dtype="fp32"), load_embedder(emb_path)
    store = make_store(tmp_path / "kb", base, emb)
    with Composer(AdapterStore(store, readonly=True), base, emb) as composer:
        hits = hits_for_atoms(composer.store, ["wiki-0", "wiki-2"])
        hits[1] = Hit(hits[1].namespace, hits[1].id, 1.0, weight=0.5)  # weights travel too
        out = export_peft(composer, hits, tmp_path / "out")
        with composer.lora.adapters(composer.compose([hits])):
            ours = logits(base.model, base.tokenizer)
        plain = logits(base.model, base.tokenizer)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    fresh = load_base_model(lm, dtype="fp32").model
    theirs = logits(peft.PeftModel.from_pretrained(fresh, out), base.tokenizer)
    assert (ours - plain).abs().max() > 1e-3  # the atoms do move the output
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def peft_lora(tmp_path, lm, **config):
    """A LoRA made and saved by PEFT itself, with random (non-zero) A and B."""
    torch.manual_seed(3)
    targets = ["c_fc"] if config.get("fan_in_fan_out") else ["up_proj", "down_proj"]
    model = peft.get_peft_model(load_base_model(lm, dtype="fp32").model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **config))
    model.save_pretrained(tmp_path / "their-lora")
    return model, tmp_path / "their-lora"


@pytest.mark.parametrize("config", [{}, {"use_rslora": True}])
def test_a_peft_lora_imports_as_an_atom_that_composes_to_peft_outputs(tmp_path, tiny_models,
                                                                       config):
    lm, emb_path = tiny_models
    base, emb = load_base_model(lm, dtype="fp32"), load_embedder(emb_path)
    store = make_store(tmp_path / "kb", base, emb)
    theirs_model, folder = peft_lora(tmp_path, lm, **config)
    theirs = logits(theirs_model, base.tokenizer)
    with AdapterStore(store) as s:
        record = import_peft(folder, s, base=base, embedder=emb, namespace="imported",
                             text="w40 w41 w42")
        assert s.documents("imported") == {folder.name: [record.id]}
        assert s.search("imported", emb.encode(["w40 w41 w42"]), 1)[0][0][0] == record.id
        again = import_peft(folder, s, base=base, embedder=emb, namespace="imported",
                            text="w40 w41 w42")
        assert again.id == record.id and s.count("imported") == 1
    with Composer(AdapterStore(store, readonly=True), base, emb) as composer:
        with composer.lora.adapters(composer.compose([[Hit("imported", record.id, 1.0)]])):
            ours = logits(base.model, base.tokenizer)
        plain = logits(base.model, base.tokenizer)
    # the store keeps adapters in bf16: the same move of the output, to bf16's ~0.4 %
    moved, error = (theirs - plain).norm(), (ours - theirs).norm()
    assert moved > 0.1 and error < 0.01 * moved, (moved, error)


def test_imports_that_do_not_fit_are_refused(tmp_path, tiny_models):
    lm, emb_path = tiny_models
    base, emb = load_base_model(lm, dtype="fp32"), load_embedder(emb_path)
    store = make_store(tmp_path / "kb", base, emb)
    other = save_tiny(tmp_path / "gpt2", "gpt2")  # another architecture: other module names
    _, folder = peft_lora(tmp_path, other, fan_in_fan_out=True)
    wrong_shape = write_peft(tmp_path / "wide", {"model.layers.2.mlp.up_proj": (
        torch.ones(2, 48), torch.ones(64, 2))}, base_model="a-wider-model")
    with AdapterStore(store) as s:
        with pytest.raises(AdapterError, match="does not have; it was trained for .*gpt2"):
            import_peft(folder, s, base=base, embedder=emb, namespace="x", text="w1")
        with pytest.raises(AdapterError, match="48->64 in the adapter but 32->64 in base "
                                               "model .* trained for a-wider-model"):
            import_peft(wrong_shape, s, base=base, embedder=emb, namespace="x", text="w1")
        with pytest.raises(MicroloraError, match="needs --text"):
            import_peft(folder, s, base=base, embedder=emb, namespace="x", text=" ")
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
        with pytest.raises(AdapterError, match="'IA3' adapter; only LORA"):
            import_peft(folder, s, base=base, embedder=emb, namespace="x", text="w1")
        with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
            import_peft(tmp_path, s, base=base, embedder=emb, namespace="x", text="w1")
        assert "x" not in s.namespaces()


def test_export_then_import_round_trips_the_delta(tmp_path, tiny_models):
    lm, emb_path = tiny_models
    base, emb = load_base_model(lm, dtype="fp32"), load_embedder(emb_path)
    store = make_store(tmp_path / "kb", base, emb)
    runner = CliRunner()
    common = ["--store", str(store), "--base-model", str(lm), "--embedder", str(emb_path)]
    r = runner.invoke(cli, ["export", str(tmp_path / "out"), *common, "--query", "w10 w11",
                            "-k", "2"])
    assert r.exit_code == 0 and "wrote a PEFT LoRA of 2 atoms" in r.output, r.output
    assert runner.invoke(cli, ["export", str(tmp_path / "o2"), *common]).exit_code == 2
    exported = read_peft(tmp_path / "out").adapter.unpack()
    r = runner.invoke(cli, ["import", str(tmp_path / "out"), *common, "-n", "back",
                            "--text", "w10 w11 w12"])
    assert r.exit_code == 0 and "rank 4" in r.output, r.output
    with AdapterStore(store, readonly=True) as s:
        (atom_id,) = s.ids("back")
        stored = s.get("back", [atom_id])[0].adapter.unpack()
    for name, (A, B) in exported.items():
        torch.testing.assert_close(stored[name][1].float() @ stored[name][0].float(), B @ A,
                                   atol=2e-3, rtol=1e-2)
    bad = runner.invoke(cli, ["export", str(tmp_path / "o3"), *common, "--atoms", "nope"])
    assert bad.exit_code == 1 and "no atom 'nope'" in bad.output


def test_broken_peft_folders_are_refused_with_the_reason(tmp_path):
    import re

    def folder(name, edit=None, adapter=None):
        out = write_peft(tmp_path / name, adapter or {"m.up": (torch.ones(2, 4),
                                                                torch.ones(3, 2))})
        if edit is not None:
            config = json.loads((out / "adapter_config.json").read_text())
            (out / "adapter_config.json").write_text(json.dumps(edit(config)))
        return out

    cases = {
        "r0": (lambda c: {**c, "r": 0}, "'r' is 0; it must be a positive whole number"),
        "list": (lambda c: [c], "holds a JSON list, not an object"),
        "regex": (lambda c: {**c, "rank_pattern": {"(": 4}},
                  "rank_pattern key '(' is not a valid regular expression"),
        "alpha": (lambda c: {**c, "lora_alpha": "big"}, "'lora_alpha' is 'big'; it must be a "
                                                        "positive number"),
        "patterns": (lambda c: {**c, "alpha_pattern": [1]},
                     "'alpha_pattern' must be an object"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(AdapterError, match=re.escape(message)):
            read_peft(folder(name, edit))
    poisoned = {"m.up": (torch.ones(2, 4), torch.ones(3, 2)),
                "m.down": (torch.ones(2, 3), torch.full((4, 2), float("nan")))}
    with pytest.raises(AdapterError, match="m.down has NaN or inf values"):
        read_peft(folder("nan", adapter=poisoned))
    with pytest.raises(AdapterError, match="m.up has NaN or inf values"):
        read_peft(folder("inf", lambda c: {**c, "lora_alpha": 1e300}))  # B * 5e299: inf in fp32
