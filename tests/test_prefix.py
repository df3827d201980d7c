"""The prompt-prefix cache (``composer.prefix``): a prefill that takes the shared prefix's
states in the unadapted blocks from the cache gives the logits and the greedy tokens of a
plain prefill, for batches of different atom sets and prompt lengths (left padding), in each
architecture (Gemma's sliding windows and global layers included); the prefix is computed
once, and again when the template, the model or its dtype changes."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    TINY_CONFIGS,
    open_composer,
    random_adapter,
    random_atom_kit,
    tiny_model,
    tiny_tokenizer,
    together_and_alone,
)
from transformers import AutoModelForCausalLM

from composer.generation import encode_prompts, generate
from composer.prefix import PrefixCache, SharedPrefix, shared_columns, template_prefix
from composer.prompts import build_prompt
from microlora.core.config import AskConfig, Mode, TargetSpec
from microlora.core.kernel import MultiLoraModel
from microlora.core.kv import new_cache
from microlora.core.pack import Packed, compose
from microlora.core.targets import find_blocks

# 20 prefix tokens, more than the tiny Gemma's sliding window (8): the window over the cached
# columns is exercised, not only the causal mask.
PREFIX = " ".join(f"w{i}" for i in range(100, 120))
SUFFIXES = ["w1 w2 w3", "w41", "w70 w71 w72 w73 w74 w75 w76 w77 w78"]  # 3 lengths: padding
CORPUS = {"wiki": [f"w{i} w{i + 1} w{i + 2} w{i + 3}" for i in range(0, 80, 10)]}


@pytest.fixture(scope="module")
def kit(tiny_models, tmp_path_factory):
    return random_atom_kit(tiny_models, tmp_path_factory.mktemp("prefix"), CORPUS)


def mixed_gemma() -> torch.nn.Module:
    """A 6-block Gemma 3 whose sliding and global layers alternate, both below and above the
    first adapted block (the tiny default one has sliding layers only)."""
    torch.manual_seed(0)
    config = TINY_CONFIGS["gemma"]()
    config.num_hidden_layers = 6
    config.layer_types = ["sliding_attention", "full_attention"] * 3
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def model_of(arch: str) -> torch.nn.Module:
    return mixed_gemma() if arch == "gemma-mixed" else tiny_model(arch)


def batch(tokenizer, prompts):
    ids, mask = encode_prompts(tokenizer, prompts, torch.device("cpu"))
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def prefix_ids(tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer(PREFIX, add_special_tokens=False)["input_ids"])


def served(cache: PrefixCache, ids_of_prefix):
    """``together_and_alone``'s batch logits through the prefix cache (which must serve)."""
    def together(model, ids, mask):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = cache.prefill(model, ids_of_prefix, ids, mask, positions, new_cache(model))
        assert out is not None, "the prefix cache did not serve this batch"
        return out
    return together


def per_row_adapters(model, last_layers: int, rows: int, seed: int = 0):
    """A ``MultiLoraModel`` on the last blocks and, for each row, its own 2 random atoms."""
    lora = MultiLoraModel(model, TargetSpec(last_layers=last_layers))
    atoms = [[Packed.of(random_adapter(lora.shapes(), 2, seed=seed + 10 * i + j))
              for j in range(2)] for i in range(rows)]
    return lora, atoms


def test_a_mixed_batch_through_the_cache_equals_each_request_alone(kit):
    base = kit[0]
    cache = PrefixCache()
    questions = [f"{PREFIX} {s}" for s in SUFFIXES]
    with open_composer(kit) as c:
        hits = c.retrieve(SUFFIXES, ["wiki"], AskConfig(k=2))
        assert len({tuple(h.id for h in row) for row in hits}) == 3  # three different sets
        together, alone = together_and_alone(c, base, questions, hits,
                                             together=served(cache, prefix_ids(base.tokenizer)))
    assert cache.captures == 1
    for i, one in enumerate(alone):
        torch.testing.assert_close(together[i:i + 1], one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gemma-mixed", "llama", "gpt2"])
def test_greedy_tokens_with_the_cache_equal_without_and_alone(arch):
    model, tok = model_of(arch), tiny_tokenizer()
    lora, atoms = per_row_adapters(model, last_layers=2, rows=len(SUFFIXES))
    prompts = [f"{PREFIX} {s}" for s in SUFFIXES]
    ids, mask, _ = batch(tok, prompts)
    cache = PrefixCache()
    shared = SharedPrefix(cache, prefix_ids(tok))

    def decode(ids_, mask_, rows, prefix=None):
        with lora.adapters(compose([atoms[i] for i in rows], [[1.0, 1.0]] * len(rows))):
            return [g.tokens for g in generate(model, tok, ids_, mask_, max_new_tokens=12,
                                               min_new_tokens=12, prefix=prefix,
                                               on_rows=lora.select_samples)]

    cached = decode(ids, mask, range(len(prompts)), shared)
    assert cache.captures == 1
    assert cached == decode(ids, mask, range(len(prompts)))
    alone = [decode(*batch(tok, [p])[:2], [i])[0] for i, p in enumerate(prompts)]
    assert cached == alone
    assert len(set(alone)) == len(alone)  # the rows did decode differently


def test_the_composer_reuses_the_prefix_and_answers_the_same(kit):
    base = kit[0]
    _, blocks = find_blocks(base.model)
    seen = []  # how many columns block 0 runs over, call by call
    hook = blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    questions = ["w1 w2 w3", "w41", "w70 w71 w72 w73 w74"]
    try:
        with open_composer(kit) as c:
            plain = AskConfig(k=2, max_new_tokens=6, min_score=None, prefix_cache=False)
            cached = AskConfig(k=2, max_new_tokens=6, min_score=None)
            want = [a.text for a in c.ask_batch(questions, ["wiki"], plain)]
            assert [a.text for a in c.ask_batch(questions, ["wiki"], cached)] == want
            assert c.prefixes.captures == 1
            shared = len(template_prefix(base.tokenizer, "qa", False))
            seen.clear()
            assert [a.text for a in c.ask_batch(questions[::-1], ["wiki"], cached)] == want[::-1]
            assert [c.ask(q, ["wiki"], cached).text for q in questions] == want
    finally:
        hook.remove()
    assert c.prefixes.captures == 1  # computed once, reused by every later batch
    assert seen and max(seen) < shared  # block 0 never ran over the prefix again


def test_another_template_gets_its_own_prefix_and_the_first_is_kept(kit):
    with open_composer(kit) as c:
        for mode, captures in ((Mode.PARAMETRIC, 1), (Mode.CONTEXT, 2), (Mode.PARAMETRIC, 2)):
            plain = AskConfig(mode=mode, k=1, max_new_tokens=4, min_score=None,
                              prefix_cache=False)
            want = [a.text for a in c.ask_batch(SUFFIXES, ["wiki"], plain)]
            got = c.ask_batch(SUFFIXES, ["wiki"], AskConfig(mode=mode, k=1, max_new_tokens=4,
                                                           min_score=None))
            assert [a.text for a in got] == want
            assert c.prefixes.captures == captures
        # a template that shares no prefix: nothing is captured, nothing is reused
        completion = AskConfig(mode=Mode.NONE, template="completion", max_new_tokens=4)
        c.ask_batch(SUFFIXES, ["wiki"], completion)
        assert c.prefixes.captures == 2


def test_another_model_or_dtype_drops_the_cached_prefix():
    tok = tiny_tokenizer()
    ids, mask, positions = batch(tok, [f"{PREFIX} {s}" for s in SUFFIXES])
    cache = PrefixCache()
    for model, captures in ((tiny_model("llama", seed=0), 1),
                            (tiny_model("llama", seed=1), 2)):
        with torch.no_grad():
            got = cache.prefill(model, prefix_ids(tok), ids, mask, positions, new_cache(model))
            want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(got, want[:, -1], atol=1e-5, rtol=1e-5)
        assert cache.captures == captures
    model.double()
    with torch.no_grad():
        got = cache.prefill(model, prefix_ids(tok), ids, mask, positions, new_cache(model))
    assert got.dtype == torch.float64 and cache.captures == 3


def test_a_prefix_held_deep_enough_serves_batches_whose_adapters_start_lower():
    """Adapters from the last block, then from the last 2, then none: one capture serves
    the first two; the base model alone needs every block's states and captures again."""
    model, tok = mixed_gemma(), tiny_tokenizer()
    ids, mask, positions = batch(tok, [f"{PREFIX} {s}" for s in SUFFIXES])
    cache = PrefixCache()
    for last_layers, captures in ((1, 1), (2, 1), (0, 2)):
        lora, atoms = per_row_adapters(model, max(last_layers, 1), len(SUFFIXES))
        adapters = compose(atoms, [[1.0, 1.0]] * len(SUFFIXES)) if last_layers else {}
        with torch.no_grad(), lora.adapters(adapters):
            got = cache.prefill(model, prefix_ids(tok), ids, mask, positions, new_cache(model))
            want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        lora.remove()
        torch.testing.assert_close(got, want[:, -1], atol=1e-5, rtol=1e-5)
        assert cache.captures == captures


def test_merged_adapters_use_the_blocks_below_them():
    model, tok = mixed_gemma(), tiny_tokenizer()
    ids, mask, positions = batch(tok, [f"{PREFIX} {SUFFIXES[0]}"])
    lora, atoms = per_row_adapters(model, 2, 1)
    cache = PrefixCache()
    with torch.no_grad(), lora.merged(compose(atoms, [[1.0, 1.0]])):
        got = cache.prefill(model, prefix_ids(tok), ids, mask, positions, new_cache(model))
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(got, want[:, -1], atol=1e-5, rtol=1e-5)
    assert cache.captures == 1 and len(cache._entries[prefix_ids(tok)].keys) == 4


def test_nothing_is_reused_where_it_cannot_be():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cache = PrefixCache()
    ids, mask, positions = batch(tok, [f"{PREFIX} {s}" for s in SUFFIXES])
    lora, atoms = per_row_adapters(model, 3, len(SUFFIXES))  # every block adapted
    with torch.no_grad(), lora.adapters(compose(atoms, [[1.0, 1.0]] * len(SUFFIXES))):
        assert cache.prefill(model, prefix_ids(tok), ids, mask, positions,
                             new_cache(model)) is None
    lora.remove()
    other = [f"w1 {PREFIX} {SUFFIXES[0]}", f"{PREFIX} {SUFFIXES[1]}"]  # row 0 differs at once
    ids, mask, positions = batch(tok, other)
    with torch.no_grad():
        assert cache.prefill(model, prefix_ids(tok), ids, mask, positions,
                             new_cache(model)) is None
    assert cache.captures == 0


def test_shared_columns_stop_at_the_first_row_that_differs():
    prefix = torch.tensor([5, 6, 7, 8, 9])
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 40, 41],   # 2 padding, then 4 prefix tokens
                        [5, 6, 7, 8, 9, 50, 51, 52],  # the whole prefix
                        [0, 5, 6, 9, 9, 9, 9, 9]])    # 1 padding, differs at the 3rd token
    pad = torch.tensor([2, 0, 1])
    assert shared_columns(ids, pad, prefix) == 3
    assert shared_columns(ids[:2], pad[:2], prefix) == 5  # row 1 leaves the prefix there
    assert shared_columns(ids[1:2, :5], pad[1:2], prefix) == 4  # the last column stays


def test_every_prompt_of_the_template_begins_with_its_prefix(kit):
    tok = kit[0].tokenizer
    for passages in (False, True):
        shared = template_prefix(tok, "qa", passages)
        assert len(shared) > 20
        for question in ("w1 w2", "Who is w5?", " w9", "(w3)"):
            prompt = build_prompt(tok, question, ["w4 w5."] if passages else (), "qa")
            ids, _ = encode_prompts(tok, [prompt], torch.device("cpu"))
            assert tuple(ids[0, :len(shared)].tolist()) == shared
    assert template_prefix(tok, "qa", False) != template_prefix(tok, "qa", True)


@pytest.mark.parametrize("arch", ["gemma-mixed", "llama"])
def test_atoms_kept_off_the_prefix_act_on_each_rows_own_tokens_only(arch):
    """adapted=False: each row's logits are those of the base model reading the prefix
    alone, then the row's own atoms reading the rest, as a plain two-step prefill gives."""
    model, tok = model_of(arch), tiny_tokenizer()
    lora, atoms = per_row_adapters(model, last_layers=2, rows=len(SUFFIXES))
    ids, mask, positions = batch(tok, [f"{PREFIX} {s}" for s in SUFFIXES])
    cache, pre = PrefixCache(), prefix_ids(tok)
    weights = [[1.0, 1.0]] * len(SUFFIXES)
    with lora.adapters(compose(atoms, weights)), torch.no_grad():
        kept_off = cache.prefill(model, pre, ids, mask, positions, new_cache(model),
                                 adapted=False)
        adapted = cache.prefill(model, pre, ids, mask, positions, new_cache(model))
    assert kept_off is not None and cache.captures == 1  # every block's states captured once
    for i, suffix in enumerate(SUFFIXES):
        row = tok(f"{PREFIX} {suffix}", return_tensors="pt").input_ids
        split = len(pre)
        assert row[0, :split].tolist() == list(pre)
        past = new_cache(model)
        with torch.no_grad():
            model(input_ids=row[:, :split], use_cache=True, **past)  # no adapters set
            with lora.adapters(compose([atoms[i]], [[1.0, 1.0]])):
                want = model(input_ids=row[:, split:], use_cache=True, **past).logits[:, -1]
        torch.testing.assert_close(kept_off[i:i + 1], want, atol=1e-5, rtol=1e-5)
    assert (adapted - kept_off).abs().max() > 1e-4  # the prefix's adapters did matter


def test_keeping_atoms_off_the_prefix_needs_the_cache_and_stacked_adapters():
    from microlora.core.errors import MicroloraError

    for bad in ({"prefix_cache": False}, {"composition": "merged"}):
        with pytest.raises(MicroloraError, match="--no-adapt-prefix"):
            AskConfig(adapt_prefix=False, **bad)


def test_by_default_only_parametric_answers_keep_the_atoms_off_the_prefix():
    """Unset, adapt_prefix follows the mode: parametric rows skip the prefix (same answers,
    a cheaper mixed batch), hybrid rows keep it (their adapter row answers better with it),
    and where skipping cannot be served (merged, no cache) the atoms act on it."""
    assert not AskConfig(mode="parametric").atoms_on_prefix
    assert AskConfig(mode="hybrid").atoms_on_prefix
    assert AskConfig(mode="parametric", composition="merged").atoms_on_prefix
    assert AskConfig(mode="parametric", prefix_cache=False).atoms_on_prefix
    assert AskConfig(mode="parametric", adapt_prefix=True).atoms_on_prefix
    assert not AskConfig(mode="hybrid", adapt_prefix=False).atoms_on_prefix
