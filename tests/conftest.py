"""Shared fixtures: tiny random models built from configs, a temporary MICROLORA_HOME."""

from __future__ import annotations

import copy
import json
import os
import threading

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from microlora.core.pack import Packed
from microlora.core.paths import HOME_ENV
from store import AdapterStore, AtomRecord, StoreHeader
from store import record as rec

TINY_CONFIGS = {
    "gemma": lambda: Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
        initializer_range=0.3),  # sharp enough logits that a rank-2 adapter can fit text
    "llama": lambda: LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1),
    "gpt2": lambda: GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=2, n_positions=64,
                               bos_token_id=0, eos_token_id=0),
}


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised 3-layer model of the given architecture, frozen, fp32, eval."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]())
    return model.eval().requires_grad_(False)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Words w0..w126 are their own ids; anything else is <unk> (127)."""
    vocab = {f"w{i}": i for i in range(127)} | {"<unk>": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def save_tiny(path, arch="llama", seed=0):
    tiny_model(arch, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def random_adapter(shapes: dict[str, tuple[int, int]], rank: int, seed: int,
                   scale: float = 0.5) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A (r, in), B (out, r)) with non-zero B, so the delta is visible."""
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(rank, d_in, generator=g) * scale,
                   torch.randn(d_out, rank, generator=g) * scale)
            for name, (d_in, d_out) in shapes.items()}


def with_deltas_added(model, atoms, scale=1.0):
    """Reference: a copy of the model whose target weights have sum_i s * B_i A_i added by hand.
    Works on a model that already carries wrappers (it adds to the wrapped base weight)."""
    ref = copy.deepcopy(model)
    for atom in atoms:
        for name, (A, B) in atom.items():
            layer = ref.get_submodule(name)
            layer = getattr(layer, "base_layer", layer)
            delta = (scale * B @ A).to(layer.weight)  # (out, in), on the weight's device
            layer.weight.data += delta.T if type(layer).__name__ == "Conv1D" else delta
    return ref


def store_of_random_atoms(path, base, emb, corpus: dict[str, list[str]], scale: float = 0.4,
                          paragraphs: bool = False):
    """A store for ``base`` whose namespaces hold the given texts as atoms with random rank-2
    adapters on the MLPs of the last 2 layers (ids ``<namespace>-<i>``, ':' as '-'); with
    ``paragraphs`` each namespace's texts are one paragraph, every atom's context.)"""
    from compiler.pipeline import store_header
    from microlora.core.config import TargetSpec
    from microlora.core.kernel import MultiLoraModel

    lora = MultiLoraModel(base.model, TargetSpec(last_layers=2))
    shapes = lora.shapes()
    lora.remove()
    with AdapterStore.create(path, store_header(base, emb)) as s:
        for n, (ns, texts) in enumerate(corpus.items()):
            vectors = emb.encode(texts)
            s.put(ns, [AtomRecord(id=f"{ns.replace(':', '-')}-{i}", text=t,
                                  adapter=Packed.of(random_adapter(shapes, 2, seed=100 * n + i,
                                                                   scale=scale)),
                                  embedding=vectors[i], base_fingerprint=base.fingerprint,
                                  source=f"{ns}.txt", start=i, end=i + len(t),
                                  context=list(texts) if paragraphs else [], context_at=i)
                       for i, t in enumerate(texts)])
    return path


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


DIM = 8
SHAPES = {"model.layers.2.mlp.up_proj": (32, 64), "model.layers.2.mlp.down_proj": (64, 32)}
HEADER = StoreHeader(base_fingerprint="base-a" * 4, base_name="tiny", embedder_fingerprint="e" * 32,
                     embedder_name="tiny-emb", embedding_dim=DIM)


def make_records(n, seed=0, fingerprint=HEADER.base_fingerprint, dim=DIM):
    vecs = unit_vectors(n, dim, seed)
    return [AtomRecord(id=f"atom{seed:02d}{i:04d}", text=f"fact {i} of batch {seed}",
                       adapter=Packed.of(random_adapter(SHAPES, rank=2, seed=1000 * seed + i)),
                       embedding=vecs[i], base_fingerprint=fingerprint, source=f"doc{seed}.txt",
                       start=10 * i, end=10 * i + 9, config={"rank": 2, "scale": 1.0})
            for i in range(n)]


def tree_bytes(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def flip_byte_inside(path, needle: bytes):
    """Flip one byte wherever ``needle`` occurs in data.mdb (LMDB may keep a stale copy of a
    page from an earlier transaction beside the live one)."""
    data = bytearray((path / "data.mdb").read_bytes())
    at = data.find(needle)
    assert at >= 0
    while at >= 0:
        data[at + len(needle) // 2] ^= 0x01
        at = data.find(needle, at + 1)
    (path / "data.mdb").write_bytes(bytes(data))


def stored_adapter_bytes(packed: Packed, dtype: str = "int8") -> bytes:
    """The bytes of an adapter as a record stores it (int8 values, or bf16)."""
    from store.quantize import quantize

    if dtype == "int8":
        return quantize(packed)[0].numpy().tobytes()
    return packed.flat.bfloat16().view(torch.int16).numpy().tobytes()


def corrupt_atom(store: AdapterStore, namespace: str, atom_id: str) -> None:
    """Flip a byte inside one atom's adapter in an open store's file, as a disk would: the
    record still decodes, only its checksum tells. (Read without checking it: a checked
    atom is not hashed again by this process.)"""
    with store.read(namespace) as reader:
        value = bytes(reader._value(atom_id))  # the record's bytes, as stored
    stored, _ = rec._parse(value)[1][rec.ADAPTER_KEY]
    flip_byte_inside(store.path, stored.tobytes()[:64])


def zero_leaf_page_of(path, needle: bytes) -> None:
    """Zero every LMDB leaf page of data.mdb that holds ``needle``, as a scribbled disk
    block would: reaching that page makes LMDB answer MDB_CORRUPTED. (Zeros, not random
    bytes: a random page may look like a branch or a leaf and crash LMDB instead.)"""
    data = bytearray((path / "data.mdb").read_bytes())
    page = 4096
    hit = [p for p in range(len(data) // page)
           if needle in data[p * page:(p + 1) * page]
           and int.from_bytes(data[p * page + 10:p * page + 12], "little") == 0x02]  # P_LEAF
    assert hit
    for p in hit:
        data[p * page:(p + 1) * page] = bytes(page)
    (path / "data.mdb").write_bytes(bytes(data))


@pytest.fixture(autouse=True)
def microlora_home(tmp_path_factory, monkeypatch):
    """Each test gets its own empty cache dir (``MICROLORA_HOME``), so no test sees another's
    stores or converted models. (tests/test_default_model.py shares one conversion of the
    default model across its tests, under ``MICROLORA_TEST_MODEL_HOME`` when that is set.)"""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv(HOME_ENV, str(home))
    return home


@pytest.fixture(params=["gemma", "llama", "gpt2"])
def arch(request) -> str:
    return request.param


TEST_DEVICE_ENV = "MICROLORA_TEST_DEVICE"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the tests marked ``cuda`` run: ``MICROLORA_TEST_DEVICE`` (default cuda; cpu
    for the dry run of benchmarks/gpu_check.sh); they skip where that device is missing."""
    dev = torch.device(os.environ.get(TEST_DEVICE_ENV, "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"no CUDA device ({TEST_DEVICE_ENV}=cpu runs these on the CPU)")
    return dev


def save_tiny_embedder(path):
    """A randomly initialised 1-layer BERT saved as a sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    raw = path / "bert"
    BertModel(BertConfig(vocab_size=132, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(raw)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3} | {f"w{i}": i + 4 for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]").save_pretrained(raw)
    word = st_models.Transformer(str(raw), max_seq_length=64)
    model = SentenceTransformer(modules=[word, st_models.Pooling(16)], device="cpu")
    model.save(str(path / "embedder"))
    return path / "embedder"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(base model folder, embedder folder) of tiny random models, saved once per session."""
    root = tmp_path_factory.mktemp("tiny-models")
    return save_tiny(root / "lm", "gemma"), save_tiny_embedder(root)


def write_cpkc(path, n):
    rows = [{"id": f"q{i}", "question": f"w{i} w{i + 1}", "context": f"w{i} w{i + 1} w{i + 2} "
             f"w{i + 3} w{i + 4} w{i + 5} w{i + 6} w{i + 7} w{i + 8}. w9{i % 10} w{i} w50 w51 "
             "w52 w53 w54 w55 w56 w57.", "answer": f"w{i + 2}", "original_answer": "w99"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def random_atom_kit(tiny_models, folder, corpus: dict[str, list[str]], device=None,
                    dtype="fp32"):
    """(base model, embedder, store path) for a store of random rank-2 atoms in ``folder``
    (the models on ``device`` (``load_base_model``'s default when None), in ``dtype``: fp32
    by default, so tests compare numerics exactly)."""
    from microlora.core.embedder import load_embedder
    from microlora.core.models import load_base_model

    lm, emb_path = tiny_models
    base = load_base_model(lm, device=device, dtype=dtype)
    emb = load_embedder(emb_path, device=device)
    return base, emb, store_of_random_atoms(folder / "kb", base, emb, corpus)


def open_composer(kit):
    """A composer over a ``random_atom_kit`` store, read-only."""
    from composer import Composer

    base, emb, path = kit
    return Composer(AdapterStore(path, readonly=True), base, emb)


def last_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, -1]


def together_and_alone(composer, base, questions, hits, together=None):
    """The questions' last logits decoded in one batch, each with its own atoms (``hits``),
    and each question's decoded alone: (together (n, V), [alone (1, V)] * n). ``together``:
    how the batch's are computed, (model, ids, mask) -> (n, V) (default: one plain forward)."""
    from composer.generation import encode_prompts

    ids, mask = encode_prompts(base.tokenizer, questions, base.device)  # left-padded
    with composer.lora.adapters(composer.compose(hits)):
        together = (together or last_logits)(base.model, ids, mask)
    alone = []
    for q, row in zip(questions, hits):
        one_ids, one_mask = encode_prompts(base.tokenizer, [q], base.device)
        with composer.lora.adapters(composer.compose([row])):
            alone.append(last_logits(base.model, one_ids, one_mask))
    return together, alone


# -- compile jobs --------------------------------------------------------------------------

def sentences(first: int, n: int) -> str:
    """n one-atom sentences of the tiny vocabulary, from word ``first`` on."""
    return " ".join(" ".join(f"w{first + 6 * i + j}" for j in range(6)) + "."
                    for i in range(n))


@pytest.fixture
def paused(monkeypatch):
    """Pause compile jobs inside their Nth training batch: ``gate(n)`` returns (reached, go)
    events; the job waits in batch n (after training it, before writing it) until ``go``."""
    from compiler.trainer import AtomTrainer

    train, calls, gates = AtomTrainer.train, [0], {}

    def gated(self, *args, **kwargs):
        calls[0] += 1
        trained = train(self, *args, **kwargs)
        if calls[0] in gates:
            reached, go = gates[calls[0]]
            reached.set()
            assert go.wait(120)
        return trained

    monkeypatch.setattr(AtomTrainer, "train", gated)

    def gate(n: int) -> tuple[threading.Event, threading.Event]:
        gates[n] = (threading.Event(), threading.Event())
        return gates[n]

    return gate
