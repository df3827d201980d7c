import pytest
from conftest import tiny_model

from microlora.core.config import TargetSpec
from microlora.core.errors import TargetError
from microlora.core.targets import select_targets


def test_default_spec_selects_mlp_of_last_layers(arch):
    model = tiny_model(arch)
    names = list(select_targets(model, TargetSpec(last_layers=2)))
    prefix = "transformer.h" if arch == "gpt2" else "model.layers"
    assert names and all(n.startswith((f"{prefix}.1.mlp.", f"{prefix}.2.mlp.")) for n in names)
    assert {n.split(".")[-1] for n in names} == (
        {"c_fc", "c_proj"} if arch == "gpt2" else {"gate_proj", "up_proj", "down_proj"})


def test_explicit_layers_and_patterns():
    model = tiny_model("llama")
    spec = TargetSpec(modules=("self_attn.q_proj", "mlp.down_proj"), layers=(0, -1))
    assert list(select_targets(model, spec)) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
        "model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"]


def test_last_layers_larger_than_model_takes_all():
    names = select_targets(tiny_model("gemma"), TargetSpec(modules=("mlp.up_proj",),
                                                           last_layers=99))
    assert len(names) == 3


def test_unmatched_pattern_lists_what_exists():
    with pytest.raises(TargetError, match="mlp.gate_proj"):
        select_targets(tiny_model("llama"), TargetSpec(modules=("ffn.*",)))


def test_bad_specs_name_the_flag():
    with pytest.raises(TargetError, match="--last-layers"):
        TargetSpec(last_layers=0)
    with pytest.raises(TargetError, match="--targets"):
        TargetSpec(modules=())
    with pytest.raises(TargetError, match="out of range"):
        select_targets(tiny_model("llama"), TargetSpec(layers=(7,)))
