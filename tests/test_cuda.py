"""The equalities the CPU tests prove, again on ``MICROLORA_TEST_DEVICE`` (default cuda;
skipped without one): kernel == PEFT, trainer loss falls and batched == alone, stacked ==
merged == the sum of deltas, a mixed batch == each request alone (through the prompt-prefix
cache too), the fused loss in bf16, and compile -> ask end to end. benchmarks/gpu_check.sh
runs them (``pytest -m cuda``), and its CPU dry run runs them on the CPU so that they cannot
rot between GPU machines."""

from dataclasses import replace

import pytest
import torch
from conftest import (
    last_logits,
    random_adapter,
    random_atom_kit,
    save_tiny,
    tiny_model,
    together_and_alone,
    with_deltas_added,
)
from test_composer import CORPUS, QUESTIONS
from test_kernel import IDS, SPEC
from test_prefix import PREFIX, SUFFIXES, prefix_ids, served
from test_trainer import KEYS, TEXTS, config

from compiler.loss import linear_cross_entropy
from compiler.trainer import AtomTrainer
from composer import Composer
from composer.generation import encode_prompts
from composer.prefix import PrefixCache
from microlora.core.config import AskConfig
from microlora.core.kernel import MultiLoraModel
from microlora.core.models import load_base_model
from microlora.core.pack import Packed, compose
from store import AdapterStore

pytestmark = pytest.mark.cuda
EXACT = dict(atol=1e-4, rtol=1e-4)  # fp32 on a GPU: other kernels, other summation orders


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_peft(device, dtype):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("gemma").to(device, dtype)
    lora = MultiLoraModel(model, SPEC)
    adapter = random_adapter(lora.shapes(), rank=2, seed=1)
    peft_model = get_peft_model(tiny_model("gemma"), LoraConfig(
        r=2, lora_alpha=2, target_modules=list(adapter), lora_dropout=0.0))
    for name, (A, B) in adapter.items():
        module = peft_model.base_model.model.get_submodule(name)
        module.lora_A["default"].weight.data.copy_(A)
        module.lora_B["default"].weight.data.copy_(B)
    peft_model.to(device, dtype).eval()
    ids = IDS.to(device)
    with torch.no_grad():
        with lora.adapters(compose([[Packed.of(adapter)]], dtype=dtype, device=device)):
            ours = model(input_ids=ids).logits.float()
        theirs = peft_model(input_ids=ids).logits.float()
        plain = tiny_model("gemma").to(device, dtype)(input_ids=ids).logits.float()
    tol = EXACT if dtype == torch.float32 else dict(atol=0.1, rtol=0.03)  # bf16: 8 bits
    torch.testing.assert_close(ours, theirs, **tol)
    assert (ours - plain).abs().max() > 10 * tol["atol"]  # the adapter matters


@pytest.fixture(scope="module")
def base(device, tmp_path_factory):
    return load_base_model(save_tiny(tmp_path_factory.mktemp("m") / "tiny", "gemma"),
                           device=device, dtype="float32")


def train(base, texts=TEXTS, keys=KEYS, **kw):
    with AtomTrainer(base.model, base.tokenizer, config(**kw)) as trainer:
        return trainer.train(texts, keys)


def test_trainer_loss_falls_and_batched_equals_alone(base):
    initial = train(base, stop_prob=0.0)  # everyone "passes" at step 0: the untrained loss
    for first, last in zip(initial, train(base, max_steps=30, stop_prob=0.99)):
        assert last.final_loss < 0.5 * first.final_loss
    together = train(base, max_steps=8, stop_prob=0.99)
    for i in range(len(TEXTS)):
        alone = train(base, texts=[TEXTS[i]], keys=[KEYS[i]], max_steps=8, stop_prob=0.99)[0]
        assert alone.steps == together[i].steps
        torch.testing.assert_close(together[i].adapter.flat, alone.adapter.flat, atol=1e-4,
                                   rtol=1e-3)


def test_the_default_recipe_trains_in_bf16(device, tmp_path):
    """bf16 autocast (a bf16 base: what "auto" holds on a GPU), batch neighbours, stored
    neighbours, question views and the distilling teacher, together: every atom's loss falls,
    and its adapter comes back in the store's form (fp32, on the CPU)."""
    base = load_base_model(save_tiny(tmp_path / "tiny", "gemma"), device=device, dtype="bf16")
    cfg = config(bf16=True, neighbours=2, distill=0.5, max_steps=15, stop_prob=0.99)
    views = [[("w10 w11", " w5")], [], [("w13", " w1 w2")], []]
    windows = ["w20 w21 w22", "w30 w31", "w40 w41", "w50"]
    stored = [a.adapter for a in train(base, texts=TEXTS[:2], keys=KEYS[:2], max_steps=3)]
    beside = [[stored[0]], [stored[1]], [], stored]

    def run(cfg):
        with AtomTrainer(base.model, base.tokenizer, cfg) as trainer:
            return trainer.train(TEXTS, KEYS, views=views, windows=windows,
                                 frozen_neighbours=beside)

    initial, trained = run(replace(cfg, stop_prob=0.0)), run(cfg)
    for first, last in zip(initial, trained):
        assert last.steps > 0 and last.final_loss < first.final_loss
        assert last.adapter.flat.device.type == "cpu"
        assert last.adapter.flat.dtype == torch.float32


@pytest.fixture(scope="module")
def kit(device, tiny_models, tmp_path_factory):
    return random_atom_kit(tiny_models, tmp_path_factory.mktemp("cuda-kit"), CORPUS,
                           device=device, dtype="float32")


def test_stacked_equals_merged_equals_the_sum_of_deltas(kit):
    base, emb, path = kit
    with Composer(AdapterStore(path, readonly=True), base, emb) as c:
        hits = c.retrieve(["w1 w2 w3"], ["wiki"], AskConfig(k=3))[0]
        stored = [r.adapter.unpack() for r in c.store.get("wiki", [h.id for h in hits])]
        ids, mask = encode_prompts(base.tokenizer, ["w1 w2 w3 w4 w5"], base.device)
        reference = last_logits(with_deltas_added(
            base.model, [{k: (A.float(), B.float()) for k, (A, B) in a.items()}
                         for a in stored]), ids, mask)
        adapters = c.compose([hits])
        assert all(A.device == base.device for A, _ in adapters.values())
        with c.lora.adapters(adapters):
            stacked = last_logits(base.model, ids, mask)
        with c.lora.merged(adapters):
            merged = last_logits(base.model, ids, mask)
        assert not torch.allclose(last_logits(base.model, ids, mask), reference, atol=1e-3)
        torch.testing.assert_close(stacked, reference, **EXACT)
        torch.testing.assert_close(merged, reference, **EXACT)


def test_a_mixed_batch_equals_each_request_alone(kit):
    base, emb, path = kit
    with Composer(AdapterStore(path, readonly=True), base, emb) as c:
        hits = c.retrieve(QUESTIONS, ["wiki"], AskConfig(k=2))
        together, alone = together_and_alone(c, base, QUESTIONS, hits)
        for i, one in enumerate(alone):
            torch.testing.assert_close(together[i:i + 1], one, **EXACT)
        for mode in ("parametric", "hybrid"):  # hybrid: the ensemble's two rows per answer
            cfg = AskConfig(k=2, max_new_tokens=6, mode=mode)
            batched = [a.text for a in c.ask_batch(QUESTIONS, ["wiki"], cfg)]
            assert batched == [c.ask(q, ["wiki"], cfg).text for q in QUESTIONS]


def test_the_prefix_cache_changes_no_answer(kit):
    base, emb, path = kit
    with Composer(AdapterStore(path, readonly=True), base, emb) as c:
        hits = c.retrieve(SUFFIXES, ["wiki"], AskConfig(k=2))
        cache = PrefixCache()
        together, alone = together_and_alone(c, base, [f"{PREFIX} {s}" for s in SUFFIXES],
                                             hits, together=served(cache,
                                                                   prefix_ids(base.tokenizer)))
        for i, one in enumerate(alone):
            torch.testing.assert_close(together[i:i + 1], one, **EXACT)
        cfg = AskConfig(k=2, max_new_tokens=6)
        plain = [a.text for a in c.ask_batch(QUESTIONS, ["wiki"],
                                             replace(cfg, prefix_cache=False))]
        assert [a.text for a in c.ask_batch(QUESTIONS, ["wiki"], cfg)] == plain
        assert cache.captures == 1 and c.prefixes.captures == 1


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_the_fused_loss_in_bf16(device, softcap):
    """bf16 states and output layer, as training runs on a GPU: the loss and gradient are
    the plain cross-entropy of the same bf16 logits, computed in fp32."""
    g = torch.Generator().manual_seed(0)
    n, vocab, d = 300, 4096, 64
    h = (torch.randn(n, d, generator=g)).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) / d ** 0.5).to(device, torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    ours, gold = linear_cross_entropy(h, w, labels, softcap)
    ours.sum().backward()
    grad_ours, h.grad = h.grad.float(), None

    logits = (h @ w.T).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    plain = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    plain.sum().backward()
    assert ours.dtype == torch.float32 and ours.device == h.device
    torch.testing.assert_close(ours, plain.detach(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gold, plain.detach(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(grad_ours, h.grad.float(), atol=2e-3, rtol=2e-2)


def test_compile_then_ask(device, tiny_models, tmp_path):
    """The whole loop on the device: compile (embedder, stored neighbours on a second
    compile, nearest company), then answer from the store."""
    from compiler.documents import Document
    from compiler.pipeline import compile_documents
    from microlora.core.config import TrainConfig
    from microlora.core.embedder import load_embedder

    lm, emb_path = tiny_models
    base = load_base_model(lm, device=device, dtype="fp32")
    emb = load_embedder(emb_path, device=device)
    cfg = TrainConfig(max_steps=3, batch_atoms=4, company="nearest")
    docs = [Document(f"d{i}", " ".join(f"w{i + j}" for j in range(12)) + ".")
            for i in range(0, 60, 10)]
    for part in (docs[:3], docs[3:]):  # the second part trains beside stored atoms
        report = compile_documents(part, tmp_path / "kb", base=base, embedder=emb,
                                   namespace="n", train_config=cfg)
        assert report.trained == report.atoms > 0
    with Composer(AdapterStore(tmp_path / "kb", readonly=True), base, emb) as c:
        answers = c.ask_batch(["w1 w2", "w31 w32"], ["n"], AskConfig(k=2, max_new_tokens=4))
    assert all(a.found and a.new_tokens > 0 for a in answers)
