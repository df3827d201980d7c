"""The multi-adapter kernel: PEFT parity, stacked == sum of deltas == merged, exact unmerge,
per-sample independence, gradients only into adapters. (Composing packed atoms into the
kernel's tensors: tests/test_pack.py.)"""


import pytest
import torch
from conftest import random_adapter, tiny_model, with_deltas_added

from microlora.core.config import TargetSpec
from microlora.core.errors import AdapterError
from microlora.core.kernel import MultiLoraLinear, MultiLoraModel
from microlora.core.pack import Packed, compose
from microlora.core.targets import select_targets

SPEC = TargetSpec(last_layers=2)
IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 1, 64]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_same_logits_as_peft(arch):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch)
    lora = MultiLoraModel(model, SPEC)
    adapter = random_adapter(lora.shapes(), rank=2, seed=1)

    peft_model = get_peft_model(tiny_model(arch), LoraConfig(
        r=2, lora_alpha=4, target_modules=list(adapter), lora_dropout=0.0,
        fan_in_fan_out=arch == "gpt2"))
    for name, (A, B) in adapter.items():
        module = peft_model.base_model.model.get_submodule(name)
        module.lora_A["default"].weight.data.copy_(A)
        module.lora_B["default"].weight.data.copy_(B)
    peft_model.eval()

    folded = {name: (A, B * 4 / 2) for name, (A, B) in adapter.items()}  # PEFT's alpha / r
    with lora.adapters(compose([[Packed.of(folded)]])):
        ours = logits(model)
    torch.testing.assert_close(ours, logits(peft_model), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, logits(tiny_model(arch)), atol=1e-3)  # the adapter matters


def test_stacked_equals_sum_of_deltas_equals_merged(arch):
    model = tiny_model(arch)
    lora = MultiLoraModel(model, SPEC)
    atoms = [random_adapter(lora.shapes(), rank=r, seed=s) for s, r in enumerate([1, 2, 2, 1])]
    reference = logits(with_deltas_added(model, atoms))
    assert not torch.allclose(reference, logits(model), atol=1e-3)

    composed = compose([[Packed.of(a) for a in atoms]])
    with lora.adapters(composed):
        stacked = logits(model)
    with lora.merged(composed):
        merged = logits(model)

    torch.testing.assert_close(stacked, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=1e-5)


def test_mixed_batch_equals_each_request_alone():
    model = tiny_model("gemma")
    base = logits(model, IDS.repeat(3, 1))
    lora = MultiLoraModel(model, SPEC)
    pool = [Packed.of(random_adapter(lora.shapes(), rank=2, seed=s)) for s in range(4)]
    requests = [[pool[0], pool[1], pool[2]], [], [pool[3]]]  # ranks 6, 0 (no adapter), 2

    with lora.adapters(compose(requests)):
        together = logits(model, IDS.repeat(3, 1))
    for b, atoms in enumerate(requests):
        with lora.adapters(compose([atoms])):
            alone = logits(model)
        torch.testing.assert_close(together[b:b + 1], alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(together[1], base[1])  # no adapter: exactly the base model


def test_unmerge_restores_weights_exactly_even_after_an_error():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = MultiLoraModel(model, SPEC)
    adapter = random_adapter(lora.shapes(), rank=2, seed=3)

    with pytest.raises(RuntimeError, match="boom"), lora.merged(adapter):
        assert not torch.equal(lora.layers[next(iter(adapter))].base_layer.weight,
                               before[next(iter(adapter)) + ".weight"])
        raise RuntimeError("boom")
    lora.merge(adapter)
    lora.unmerge()
    lora.unmerge()  # a second unmerge is a no-op
    for name, value in lora.remove().state_dict().items():
        assert torch.equal(value, before[name]), name


def test_merge_twice_is_refused_and_leaves_one_merge():
    model = tiny_model("llama")
    lora = MultiLoraModel(model, SPEC)
    adapter = random_adapter(lora.shapes(), rank=1, seed=4)
    lora.merge(adapter)
    once = logits(model)
    with pytest.raises(AdapterError, match="already merged"):
        lora.merge(adapter)
    assert torch.equal(logits(model), once)  # the refused merge changed nothing
    lora.unmerge()
    assert torch.equal(logits(model), logits(tiny_model("llama")))


def test_gradients_reach_only_adapter_parameters():
    model = tiny_model("gemma")
    lora = MultiLoraModel(model, SPEC)
    shapes = lora.shapes()
    n_atoms = 3
    params = {n: (torch.nn.Parameter(torch.randn(n_atoms, 2, i) * 0.1),
                  torch.nn.Parameter(torch.randn(n_atoms, o, 2) * 0.1))
              for n, (i, o) in shapes.items()}
    with lora.adapters(params):
        out = model(input_ids=IDS.repeat(n_atoms, 1), labels=IDS.repeat(n_atoms, 1))
    out.loss.backward()
    assert all(p.grad is None for p in model.parameters())
    for A, B in params.values():
        assert A.grad is not None and B.grad is not None and B.grad.abs().sum() > 0


def test_per_sample_gradients_are_independent():
    """Atom b's loss only moves atom b's adapter: the basis of training many atoms at once."""
    model = tiny_model("llama")
    lora = MultiLoraModel(model, SPEC)
    params = {n: (torch.nn.Parameter(torch.randn(2, 2, i) * 0.1),
                  torch.nn.Parameter(torch.randn(2, o, 2) * 0.1))
              for n, (i, o) in lora.shapes().items()}
    with lora.adapters(params):
        out = model(input_ids=IDS.repeat(2, 1)).logits
    out[0].sum().backward()  # loss of sample 0 only
    for A, B in params.values():
        assert A.grad[1].abs().sum() == 0 and B.grad[1].abs().sum() == 0
        assert B.grad[0].abs().sum() > 0


def test_remove_puts_the_original_modules_back():
    model = tiny_model("gpt2")
    originals = select_targets(model, SPEC)
    lora = MultiLoraModel(model, SPEC)
    assert all(isinstance(model.get_submodule(n), MultiLoraLinear) for n in originals)
    lora.remove()
    assert all(model.get_submodule(n) is m for n, m in originals.items())


def test_shape_errors_are_clear():
    model = tiny_model("llama")
    lora = MultiLoraModel(model, SPEC)
    name, (d_in, d_out) = next(iter(lora.shapes().items()))
    with pytest.raises(AdapterError, match="do not fit"):
        lora.set_adapters({name: (torch.zeros(1, 2, d_in + 1), torch.zeros(1, d_out, 2))})
    with pytest.raises(AdapterError, match="not targets"):
        lora.set_adapters({"model.embed_tokens": (torch.zeros(1, 2, 4), torch.zeros(1, 4, 2))})
    with pytest.raises(AdapterError, match="samples"):
        with lora.adapters({name: (torch.zeros(2, 2, d_in), torch.zeros(2, d_out, 2))}):
            model(input_ids=IDS.repeat(3, 1))
    with pytest.raises(AdapterError, match="one request"):
        lora.merge({name: (torch.zeros(2, 2, d_in), torch.zeros(2, d_out, 2))})
    with pytest.raises(AdapterError, match="NaN"):
        lora.merge({name: (torch.full((1, d_in), float("inf")), torch.ones(d_out, 1))})
    assert not any(layer.merged for layer in lora.layers.values())
