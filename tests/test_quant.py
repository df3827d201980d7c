"""A weight-only quantized base (``--base-dtype int8|int4``): its linears against the float
ones, adapters training through it, and the store refusing to mix quantizations."""

import copy
import json
import logging

import lmdb
import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny, tiny_model
from torch import nn

from compiler.pipeline import compile_corpus
from compiler.trainer import AtomTrainer
from composer import Composer
from microlora.cli import cli
from microlora.core.config import AskConfig, ChunkConfig, TargetSpec, TrainConfig
from microlora.core.embedder import load_embedder
from microlora.core.errors import AdapterError, ModelLoadError, StoreMismatchError
from microlora.core.kernel import MultiLoraModel
from microlora.core.models import load_base_model
from microlora.core.quant import KERNEL_ROWS, QuantizedLinear, _int4_order, quantize_linears
from microlora.core.targets import find_blocks, is_linear
from store import AdapterStore

RECIPE = TrainConfig(targets=TargetSpec(last_layers=2), max_steps=3, lr=2e-2, bf16=False,
                     batch_atoms=4, neighbours=1)
CHUNK = ChunkConfig(max_tokens=16, min_chars=10)
DOC = "w1 w2 w3 w4 w5 w6 w7 w8. w9 w10 w11 w12 w13 w14 w15.\n\nw16 w17 w18 w19 w20 w21 w22."


def linear(kind: str, d_in=64, d_out=48, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv1d":  # GPT-2's linear: weight stored (in, out)
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(d_out, d_in)
        nn.init.normal_(layer.weight, std=0.5)
        nn.init.normal_(layer.bias, std=0.5)
        return layer
    return nn.Linear(d_in, d_out)


# worst relative error of y = x W^T per output (|dy| / |y|): int8 rounds each weight to 1/254 of
# its row's largest, int4 to 1/30 of its group's range
BOUNDS = {8: 0.02, 4: 0.25}


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_is_close_to_its_float_linear(kind, bits):
    layer = linear(kind)
    q = QuantizedLinear.of(layer, bits)
    w = layer.weight.detach().T if kind == "conv1d" else layer.weight.detach()  # (out, in)
    deq = q.dequantize()
    assert deq.shape == w.shape == (q.out_features, q.in_features)
    # each weight is within half a quantization step of the original
    if bits == 8:
        step = w.abs().amax(1, keepdim=True) / 127
    else:
        g = w.reshape(w.shape[0], -1, q.group_size)
        step = ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15).expand_as(g)
        step = step.reshape(w.shape)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(3, 5, q.in_features)
    ref = layer(x)
    y = q(x)
    assert y.shape == ref.shape
    rel = (y - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert rel.max() < BOUNDS[bits]
    # the CPU kernel computes exactly what dequantize() says W is (its packed layout read right)
    flat = x.reshape(-1, q.in_features)
    assert torch.allclose(q._matmul(flat), flat @ deq.T, atol=1e-4, rtol=1e-4)
    many = torch.randn(KERNEL_ROWS + 5, q.in_features)  # prefill, training: W dequantised
    kernel = torch.cat([q._kernel(rows) for rows in many.split(64)])
    assert torch.allclose(q._matmul(many), kernel, atol=1e-4, rtol=1e-4)
    if bits == 4:  # read from the packed bytes, not through the kernel
        assert _int4_order(q.out_features, q.in_features) is not None


def test_int4_needs_a_shape_its_kernel_takes():
    assert not QuantizedLinear.fits(nn.Linear(48, 32), 4)  # in % 32
    assert not QuantizedLinear.fits(nn.Linear(64, 24), 4)  # out % 16
    assert QuantizedLinear.fits(nn.Linear(48, 24), 8)
    with pytest.raises(ValueError, match="int4"):
        QuantizedLinear.of(nn.Linear(48, 32), 4)


def _dequantized_copy(model: nn.Module) -> nn.Module:
    """The same function with every QuantizedLinear replaced by a float nn.Linear of its
    dequantized weight: the reference for gradients."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, QuantizedLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantize()
            if m.bias is not None:
                lin.bias.data = m.bias.float()
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, lin.requires_grad_(False))
    return ref


@pytest.mark.parametrize("bits", [8, 4])
def test_adapter_gradients_flow_through_quantized_linears(bits):
    """Adapters of the last two blocks, below quantized linears (attention and MLP of the top
    block): their gradients equal those through the same weights in float."""
    model = tiny_model("llama")
    prefix, blocks = find_blocks(model)
    linears = {f"{prefix}.{i}.{rel}": m for i, b in enumerate(blocks)
               for rel, m in b.named_modules() if is_linear(m)}
    assert quantize_linears(linears, model, bits) == []
    reference = _dequantized_copy(model)
    ids = torch.randint(0, 128, (2, 7))
    grads = []
    for m in (model, reference):
        lora = MultiLoraModel(m, TargetSpec(last_layers=2))
        g = torch.Generator().manual_seed(1)
        params = {n: (torch.randn(2, 2, i, generator=g).requires_grad_(),
                      (torch.randn(2, o, 2, generator=g) * 0.1).requires_grad_())
                  for n, (i, o) in lora.shapes().items()}
        lora.set_adapters(params)
        m(input_ids=ids).logits.logsumexp(-1).mean().backward()
        grads.append({n: (A.grad, B.grad) for n, (A, B) in params.items()})
        lora.remove()
    lower = next(n for n in grads[0] if ".1." in n)  # block 1: below block 2's quantized ones
    assert grads[0][lower][0].abs().sum() > 0
    for n, (gA, gB) in grads[0].items():
        assert torch.allclose(gA, grads[1][n][0], atol=1e-5, rtol=1e-3), n
        assert torch.allclose(gB, grads[1][n][1], atol=1e-5, rtol=1e-3), n
    assert not any(b.requires_grad for b in model.buffers())


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("quant") / "llama", "llama")


@pytest.mark.parametrize("dtype, bound", [("int8", 0.05), ("int4", 0.3)])
def test_quantized_base_logits_are_close_to_fp32(lm, dtype, bound):
    fp32 = load_base_model(lm, dtype="fp32")
    bf16 = load_base_model(lm, dtype="bf16")
    quant = load_base_model(lm, dtype=dtype)
    assert quant.base_dtype == dtype and quant.quantization == dtype
    assert (fp32.base_dtype, bf16.base_dtype, fp32.quantization) == ("fp32", "bf16", None)
    assert quant.fingerprint == fp32.fingerprint  # the checkpoint's name, whatever the dtype
    assert quant.dtype == torch.bfloat16 and quant.num_parameters == fp32.num_parameters
    _, blocks = find_blocks(quant.model)
    assert all(isinstance(m, QuantizedLinear) for b in blocks for m in b.modules()
               if is_linear(m))
    assert isinstance(quant.model.lm_head, nn.Linear)  # the output layer stays float
    assert quant.weight_bytes < bf16.weight_bytes < fp32.weight_bytes
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = fp32.model(input_ids=ids).logits
        rounded = bf16.model(input_ids=ids).logits.float()
        got = quant.model(input_ids=ids).logits.float()
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
    assert rel < bound
    assert rel > ((rounded - ref).norm(dim=-1) / ref.norm(dim=-1)).max()  # quantized: rounder
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.7


def test_int4_is_refused_off_the_cpu_and_unknown_dtypes_name_the_flag(lm):
    with pytest.raises(ModelLoadError, match="int4 runs on the CPU only"):
        load_base_model(lm, device="cuda", dtype="int4")
    with pytest.raises(ModelLoadError, match="--base-dtype takes auto, fp32, bf16, int8, int4"):
        load_base_model(lm, dtype="int3")


def test_training_through_an_int8_base_lowers_the_loss_and_leaves_it_alone(tiny_models):
    base = load_base_model(tiny_models[0], dtype="int8")  # gemma: logits sharp enough to fit
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    texts, keys = ["w1 w2 w3 w4 w5", "w9 w8 w7", "w40 w41 w42 w43"], ["a", "b", "c"]
    cfg = dict(targets=TargetSpec(last_layers=2), lr=2e-2, neighbours=0, vocab_candidates=0)
    with AtomTrainer(base.model, base.tokenizer, TrainConfig(**cfg, stop_prob=0.0)) as t:
        initial = t.train(texts, keys)
    with AtomTrainer(base.model, base.tokenizer,
                     TrainConfig(**cfg, max_steps=30, stop_prob=0.99)) as t:
        trained = t.train(texts, keys)
    for first, last in zip(initial, trained):
        assert last.final_loss < 0.5 * first.final_loss
    after = base.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_merging_into_a_quantized_base_is_refused_by_name(lm):
    base = load_base_model(lm, dtype="int8")
    lora = MultiLoraModel(base.model, TargetSpec(last_layers=1))
    adapter = {n: (torch.ones(1, i), torch.ones(o, 1)) for n, (i, o) in lora.shapes().items()}
    with pytest.raises(AdapterError, match="--composition stacked"):
        lora.merge(adapter)
    assert not any(layer.merged for layer in lora.layers.values())


# -- the store records it -------------------------------------------------------------------

@pytest.fixture(scope="module")
def emb(tiny_models):
    return load_embedder(tiny_models[1])


def _compile(tmp_path, base, emb, store):
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "a.txt").write_text(DOC)
    return compile_corpus([docs], store, base=base, embedder=emb, namespace="docs",
                          train_config=RECIPE, chunk_config=CHUNK)


def _raw_header(path) -> dict:
    env = lmdb.open(str(path), readonly=True, max_dbs=4, lock=False)
    with env.begin() as txn:
        raw = txn.get(b"header", db=env.open_db(b"__meta__", txn=txn, create=False))
    env.close()
    return json.loads(raw)


def test_the_store_records_the_quantization_and_compiling_never_mixes(tmp_path, lm, emb,
                                                                      tiny_models, caplog):
    int8 = load_base_model(lm, dtype="int8")
    assert _compile(tmp_path, int8, emb, tmp_path / "q").trained > 0
    header = _raw_header(tmp_path / "q")
    assert header["base_dtype"] == "int8" and header["format_version"] == 2
    fp32 = load_base_model(lm, dtype="fp32")
    assert _compile(tmp_path, fp32, emb, tmp_path / "f").trained > 0
    assert "base_dtype" not in _raw_header(tmp_path / "f")  # a float store reads as before
    assert _raw_header(tmp_path / "f")["format_version"] == 2  # a new store (int8 adapters)
    # compiling into a store of the other quantization: refused, naming the flag, nothing written
    for base, other in ((fp32, "q"), (int8, "f")):
        before = {p: p.read_bytes() for p in (tmp_path / other).glob("*.mdb")
                  if p.name != "lock.mdb"}
        with pytest.raises(StoreMismatchError, match="--base-dtype"):
            _compile(tmp_path, base, emb, tmp_path / other)
        assert before == {p: p.read_bytes() for p in (tmp_path / other).glob("*.mdb")
                          if p.name != "lock.mdb"}
    # answering: the store's quantization by default; another one works, with a warning
    with Composer.open(tmp_path / "q", base_model=lm, embedder=tiny_models[1]) as c:
        assert c.base.base_dtype == "int8"
    caplog.set_level(logging.WARNING)
    with Composer(AdapterStore(tmp_path / "q", readonly=True), fp32, emb) as c:
        assert c.ask("w1 w2", ["docs"], AskConfig(max_new_tokens=2, min_score=None)).found
    assert any("--base-dtype" in r.getMessage() and "int8" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with Composer(AdapterStore(tmp_path / "q", readonly=True), int8, emb) as c:
        answer = c.ask("w1 w2", ["docs"], AskConfig(max_new_tokens=2, min_score=None))
        assert answer.found and answer.new_tokens > 0
        with pytest.raises(AdapterError, match="--composition stacked"):
            c.ask("w1 w2", ["docs"], AskConfig(max_new_tokens=2, min_score=None,
                                               composition="merged"))
    assert not [r for r in caplog.records if "--base-dtype" in r.getMessage()]


def test_cli_base_dtype(tmp_path, tiny_models, caplog):
    lm, emb = tiny_models
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(DOC)
    common = ["--store", str(tmp_path / "s"), "--base-model", str(lm), "--embedder", str(emb)]
    recipe = ["--last-layers", "2", "--steps", "2", "--max-atom-tokens", "16", "--qa-views", "0"]
    bad = CliRunner().invoke(cli, ["compile", str(docs), *common, *recipe, "--base-dtype", "int3"])
    assert bad.exit_code == 2 and "--base-dtype" in bad.output and "int8" in bad.output
    done = CliRunner().invoke(cli, ["compile", str(docs), *common, *recipe,
                                    "--base-dtype", "int8"])
    assert done.exit_code == 0, done.output
    stats = CliRunner().invoke(cli, ["store", "stats", "--store", str(tmp_path / "s")])
    assert "int8" in stats.output
    again = CliRunner().invoke(cli, ["compile", str(docs), *common, *recipe])  # the store's
    assert again.exit_code == 0 and "already compiled" in again.output, again.output
    mixed = CliRunner().invoke(cli, ["compile", str(docs), *common, *recipe,
                                     "--base-dtype", "fp32"])
    assert mixed.exit_code == 1 and "--base-dtype int8" in mixed.output
    assert "Traceback" not in mixed.output
    caplog.set_level(logging.WARNING)
    asked = CliRunner().invoke(cli, ["ask", "w1 w2", *common, "--json", "--min-score", "-1"])
    assert asked.exit_code == 0, asked.output
    assert not [r for r in caplog.records if "--base-dtype" in r.getMessage()]  # the store's
    asked = CliRunner().invoke(cli, ["ask", "w1 w2", *common, "--json", "--min-score", "-1",
                                     "--base-dtype", "bf16"])
    assert asked.exit_code == 0, asked.output
    assert [r for r in caplog.records if "--base-dtype bf16" in r.getMessage()]


def test_the_server_takes_the_stores_quantization_and_refuses_another(tmp_path, lm, emb,
                                                                     tiny_models):
    from microlora.server.service import open_service

    _compile(tmp_path, load_base_model(lm, dtype="int8"), emb, tmp_path / "s")
    with pytest.raises(StoreMismatchError, match="--base-dtype int8"):  # it compiles uploads
        open_service(tmp_path / "s", base_model=str(lm), embedder=str(tiny_models[1]),
                     base_dtype="fp32")
    service = open_service(tmp_path / "s", base_model=str(lm), embedder=str(tiny_models[1]))
    try:
        assert service.composer.base.base_dtype == "int8"
    finally:
        service.close()
