"""The composer: retrieval across namespaces, stacked == merged == summed deltas, mixed batches,
exact restore after merges, user isolation, and the errors a user can hit."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from conftest import (
    corrupt_atom,
    last_logits,
    open_composer,
    random_atom_kit,
    save_tiny,
    store_of_random_atoms,
    together_and_alone,
    with_deltas_added,
)

from compiler.pipeline import store_header
from composer import Composer, Hit
from composer.composer import NOTHING_FOUND
from composer.generation import cut_at_stop, encode_prompts
from composer.prompts import ANSWER_END
from microlora.cli import cli
from microlora.core.config import AskConfig, Mode
from microlora.core.embedder import load_embedder
from microlora.core.errors import MicroloraError, StoreMismatchError, UnknownNamespaceError
from microlora.core.models import load_base_model
from microlora.core.pack import Packed
from store import AdapterStore, AtomRecord

CORPUS = {
    "wiki": [f"w{i} w{i + 1} w{i + 2} w{i + 3}" for i in range(0, 80, 10)],
    "user:ana": ["w3 w5 w7 w9", "w11 w13 w15", "w21 w23 w25"],
    "user:bob": ["w3 w5 w7 w8", "w11 w13 w16", "w90 w91 w92"],
}
QUESTIONS = ["w1 w2 w3", "w41 w42", "w70 w71 w72 w73 w74"]
ONE_ATOM = Packed.of({"model.layers.2.mlp.up_proj": (torch.zeros(1, 32), torch.zeros(64, 1))})


@pytest.fixture(scope="module")
def kit(tiny_models, tmp_path_factory):
    """(base model, embedder, store path) with random rank-2 atoms in three namespaces."""
    return random_atom_kit(tiny_models, tmp_path_factory.mktemp("composer"), CORPUS)


def test_stacked_merged_and_the_sum_of_deltas_agree(kit):
    base = kit[0]
    with open_composer(kit) as c:
        hits = c.retrieve(["w1 w2 w3"], ["wiki"], AskConfig(k=3))[0]
        stored = [r.adapter.unpack() for r in c.store.get("wiki", [h.id for h in hits])]
        ids, mask = encode_prompts(base.tokenizer, ["w1 w2 w3 w4 w5"], base.device)
        plain = last_logits(base.model, ids, mask)
        reference = last_logits(with_deltas_added(
            base.model, [{k: (A.float(), B.float()) for k, (A, B) in a.items()}
                         for a in stored]), ids, mask)
        adapters = c.compose([hits])
        with c.lora.adapters(adapters):
            stacked = last_logits(base.model, ids, mask)
        with c.lora.merged(adapters):
            merged = last_logits(base.model, ids, mask)
        assert not torch.allclose(plain, reference, atol=1e-3)  # the atoms do change outputs
        torch.testing.assert_close(stacked, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged, reference, atol=1e-5, rtol=1e-5)
        # and through the whole ask path, both compositions answer the same
        answers = {comp: c.ask("w1 w2 w3", ["wiki"], AskConfig(k=3, composition=comp,
                                                                 max_new_tokens=6)).text
                   for comp in ("stacked", "merged")}
        assert answers["stacked"] == answers["merged"]


@pytest.mark.parametrize("weighting", ["score", "mean"])
def test_weighting_scales_each_delta(kit, weighting):
    base = kit[0]
    with open_composer(kit) as c:
        hits = c.retrieve(["w1 w2 w3"], ["wiki"], AskConfig(k=3, weighting=weighting))[0]
        if weighting == "score":  # cosines normalised to mean 1
            assert sum(h.weight for h in hits) == pytest.approx(3.0)
            assert len({round(h.weight, 6) for h in hits}) > 1
        else:  # the mean delta: 1/k each
            assert [h.weight for h in hits] == pytest.approx([1 / 3] * 3)
        stored = [r.adapter.unpack() for r in c.store.get("wiki", [h.id for h in hits])]
        weighted = [{k: (A.float(), B.float() * h.weight) for k, (A, B) in a.items()}
                    for a, h in zip(stored, hits)]
        ids, mask = encode_prompts(base.tokenizer, ["w1 w2 w3"], base.device)
        with c.lora.adapters(c.compose([hits])):
            ours = last_logits(base.model, ids, mask)
        torch.testing.assert_close(ours, last_logits(with_deltas_added(base.model, weighted),
                                                     ids, mask), atol=1e-5, rtol=1e-5)


def test_a_mixed_batch_equals_each_request_alone(kit):
    base = kit[0]
    with open_composer(kit) as c:
        hits = c.retrieve(QUESTIONS, ["wiki"], AskConfig(k=2))
        assert len({tuple(h.id for h in row) for row in hits}) == 3  # three different sets
        together, alone = together_and_alone(c, base, QUESTIONS, hits)
        for i, one in enumerate(alone):
            torch.testing.assert_close(together[i:i + 1], one, atol=1e-5, rtol=1e-5)
        config = AskConfig(k=2, max_new_tokens=6)
        batched = [a.text for a in c.ask_batch(QUESTIONS, ["wiki"], config)]
        assert batched == [c.ask(q, ["wiki"], config).text for q in QUESTIONS]


def test_ragged_requests_compose_with_padding(kit):
    """min_score can leave requests with different numbers of atoms, or none."""
    base = kit[0]
    with open_composer(kit) as c:
        hits = c.retrieve(QUESTIONS, ["wiki"], AskConfig(k=3))
        ragged = [hits[0][:1], hits[1], []]
        ids, mask = encode_prompts(base.tokenizer, QUESTIONS, base.device)
        plain = last_logits(base.model, ids, mask)
        with c.lora.adapters(c.compose(ragged)):
            together = last_logits(base.model, ids, mask)
        torch.testing.assert_close(together[2], plain[2])  # no atoms: exactly the base model
        one_ids, one_mask = encode_prompts(base.tokenizer, QUESTIONS[:1], base.device)
        with c.lora.adapters(c.compose([ragged[0]])):
            alone = last_logits(base.model, one_ids, one_mask)
        torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)


def test_merged_restores_the_base_weights_exactly_even_when_generation_fails(kit, monkeypatch):
    import composer.composer as composer_module

    base = kit[0]
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    seen = {}

    def failing_generate(model, *args, **kwargs):
        now = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
        seen["changed"] = any(not torch.equal(now[k], before[k]) for k in before)
        raise RuntimeError("generation blew up")

    with open_composer(kit) as c:
        monkeypatch.setattr(composer_module, "generate", failing_generate)
        with pytest.raises(RuntimeError, match="blew up"):
            c.ask("w1 w2 w3", ["wiki"], AskConfig(k=3, composition="merged"))
        assert seen["changed"]  # the merge really happened inside the request
        assert not any(layer.merged for layer in c.lora.layers.values())
        with pytest.raises(RuntimeError):
            c.ask("w1 w2 w3", ["wiki"], AskConfig(k=3))
        assert all(layer.lora_A is None for layer in c.lora.layers.values())
    after = base.model.state_dict()
    assert after.keys() == before.keys()  # the wrappers are gone after close()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_user_never_sees_another_users_atoms(kit):
    with open_composer(kit) as c:
        layered = c.retrieve(CORPUS["user:bob"], ["user:ana", "wiki"],
                             AskConfig(k=len(CORPUS["user:ana"]) + len(CORPUS["wiki"])))
        assert {h.namespace for row in layered for h in row} == {"user:ana", "wiki"}
        shared = c.retrieve(CORPUS["user:ana"] + CORPUS["user:bob"], None,
                            AskConfig(k=len(CORPUS["wiki"])))
        assert {h.namespace for row in shared for h in row} == {"wiki"}
        answer = c.ask(CORPUS["user:bob"][0], ["user:ana"], AskConfig(k=3, max_new_tokens=2))
        assert {s.hit.namespace for s in answer.sources} == {"user:ana"}
        assert {s.text for s in answer.sources} == set(CORPUS["user:ana"])


def test_modes_decide_what_is_used(kit, monkeypatch):
    """What generation receives, by mode: the prompt it decodes and whether any adapter is
    active on the model while it does (spied on at the call, not inferred afterwards)."""
    import composer.composer as composer_module

    seen = []
    real = composer_module.generate

    def spy(model, tokenizer, ids, mask, **kwargs):
        active = [layer for layer in c.lora.layers.values() if layer.lora_A is not None]
        seen.append((tokenizer.decode(ids[0][mask[0].bool()]), bool(active)))
        return real(model, tokenizer, ids, mask, **kwargs)

    monkeypatch.setattr(composer_module, "generate", spy)
    with open_composer(kit) as c:
        answers = {mode: c.ask("w1 w2 w3", ["wiki"], AskConfig(mode=mode, k=2,
                                                                max_new_tokens=4))
                   for mode in ("none", "context", "parametric")}
    (none_prompt, none_adapted), (ctx_prompt, ctx_adapted), (par_prompt, par_adapted) = seen
    assert answers["none"].sources == [] and not none_adapted
    texts = [s.text for s in answers["context"].sources]
    assert len(texts) == 2 and answers["context"].mode is Mode.CONTEXT
    assert all(t in ctx_prompt for t in texts) and not ctx_adapted
    assert len(answers["parametric"].sources) == 2 and par_adapted
    assert not any(t in par_prompt for t in texts) and par_prompt == none_prompt


def test_streamed_text_is_the_answer(kit):
    pieces = []
    with open_composer(kit) as c:
        answer = c.ask("w1 w2 w3", ["wiki"], AskConfig(k=2, max_new_tokens=8),
                       on_text=pieces.append)
    assert answer.text and "".join(pieces) == answer.text


def test_a_batch_streams_every_row_separately(kit):
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    with open_composer(kit) as c:
        answers = c.ask_batch(QUESTIONS, ["wiki"], AskConfig(k=2, max_new_tokens=8),
                              on_text=lambda row, piece: pieces[row].append(piece))
    assert ["".join(p) for p in pieces.values()] == [a.text for a in answers]
    assert all(a.prompt_tokens > 0 for a in answers)


@pytest.mark.parametrize("raw, answer", [
    (" Port Anselm\nQuestion: x", "Port Anselm"),
    (" Joseph Schumpeter , begun in 1941", "Joseph Schumpeter"),
    (" John F. Kelly . It was announced", "John F. Kelly"),
    (" the U.S. Army. Later", "the U.S. Army"),
    (" between 1588 and 1592.", "between 1588 and 1592"),
    (" Nathan Bedford Forrest III (born 1921)", "Nathan Bedford Forrest III"),
    ("\n Drevik", "Drevik"),
    ("no stop here ", "no stop here"),
])
def test_short_answers_end_where_the_answer_does(raw, answer):
    assert cut_at_stop(raw, ANSWER_END) == answer


@pytest.mark.parametrize("make_error", ["empty_store", "emptied_namespace", "k_too_large",
                                        "unknown_namespace", "blank_question"])
def test_clear_errors(kit, tmp_path, make_error):
    base, emb, path = kit
    if make_error in ("empty_store", "emptied_namespace"):
        path = tmp_path / "kb"
        with AdapterStore.create(path, store_header(base, emb)) as s:
            if make_error == "emptied_namespace":
                s.put("wiki", [AtomRecord(id="a", text="w1", adapter=ONE_ATOM, embedding=emb.encode(
                    ["w1"])[0], base_fingerprint=base.fingerprint)])
                s.delete("wiki", ["a"])
    expected = {"empty_store": (MicroloraError, "no shared namespaces"),
                "emptied_namespace": (MicroloraError, "hold no atoms"),
                "k_too_large": (MicroloraError, "-k 8 or less"),
                "unknown_namespace": (UnknownNamespaceError, "it has: user:ana, user:bob, wiki"),
                "blank_question": (MicroloraError, "non-empty")}[make_error]
    question = "  " if make_error == "blank_question" else "w1 w2"
    k = 9 if make_error == "k_too_large" else 2
    namespaces = ["nope"] if make_error == "unknown_namespace" else None
    with Composer(AdapterStore(path, readonly=True), base, emb) as c, \
            pytest.raises(expected[0], match=expected[1]):
        c.ask(question, namespaces, AskConfig(k=k))


def test_a_corrupt_atom_is_skipped_with_a_warning_naming_it(tiny_models, tmp_path, caplog):
    kit = random_atom_kit(tiny_models, tmp_path, {"wiki": CORPUS["wiki"]})
    config = AskConfig(k=3, max_new_tokens=4)
    with Composer(AdapterStore(kit[2]), *kit[:2]) as c:
        hits = c.retrieve(["w1 w2 w3"], config=config)[0]  # (and saves the index)
        victim = hits[0]
        corrupt_atom(c.store, "wiki", victim.id)
    rest = [h for h in hits if h is not victim]
    with open_composer(kit) as c, caplog.at_level(logging.WARNING):
        answer = c.ask("w1 w2 w3", config=config)
        assert [s.hit.id for s in answer.sources] == [h.id for h in rest]
        assert answer.text == c.ask_batch(["w1 w2 w3"], config=config, hits=[rest])[0].text
        alone = c.ask("w1 w2 w3", config=replace(config, k=1))  # its only atom is bad
    assert not alone.found and alone.text == NOTHING_FOUND
    assert f"atom {victim.id} in 'wiki' is corrupt" in caplog.text
    assert "microlora store verify" in caplog.text


def test_the_composer_refuses_a_store_of_another_base_model(kit, tmp_path):
    _, emb, path = kit
    stranger = load_base_model(save_tiny(tmp_path / "other", "gemma", seed=7))
    store = AdapterStore(path, readonly=True)
    with pytest.raises(StoreMismatchError, match="--base-model"):
        Composer(store, stranger, emb)
    store.close()


def test_cli_ask_explain_and_json(kit, tiny_models):
    _, _, path = kit
    lm, emb = tiny_models
    common = ["--store", str(path), "--base-model", str(lm), "--embedder", str(emb)]
    result = CliRunner().invoke(cli, ["ask", "w1 w2 w3", *common, "-k", "2", "--explain",
                                      "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "2 atoms composed (parametric, stacked)" in result.output
    assert "[wiki] wiki.txt:" in result.output
    result = CliRunner().invoke(cli, ["ask", "w1 w2", *common, "-n", "user:ana", "--json",
                                      "--mode", "hybrid", "-k", "3", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["mode"] == "hybrid" and len(data["sources"]) == 3
    assert {s["namespace"] for s in data["sources"]} == {"user:ana"}


def test_cli_ask_errors_are_one_clean_line(kit, tiny_models, tmp_path):
    lm, emb = tiny_models
    missing = tmp_path / "nowhere"
    result = CliRunner().invoke(cli, ["ask", "w1", "--store", str(missing), "--base-model",
                                      str(lm), "--embedder", str(emb)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error:" in result.output and not missing.exists()
    result = CliRunner().invoke(cli, ["ask", "w1", "--store", str(kit[2]), "--base-model",
                                      str(lm), "--embedder", str(emb), "-k", "50"])
    assert result.exit_code == 1 and "-k 8 or less" in result.output


def test_no_repeat_bans_only_repeats_of_the_answer_itself():
    from composer.generation import _ban_repeats

    # answer so far 5 6 5: the bigram (5, 6) was generated, so 6 is banned next
    logits = torch.zeros(2, 10)
    _ban_repeats(logits, [[5, 6, 5], [8, 9]], 2)
    assert (logits[0] == float("-inf")).nonzero().flatten().tolist() == [6]
    assert torch.isfinite(logits[1]).all()  # (8, 9) then nothing to repeat yet


def test_end_bias_ends_answers_once_begun(kit):
    """The bias goes to the answer-ending tokens from the second token on: a huge one makes
    every answer its first token and then the end; none changes nothing."""
    from composer.generation import generate

    base = kit[0]
    tok = base.tokenizer
    ids, mask = encode_prompts(tok, ["w1 w2 w3 w4 w5", "w9", "w7 w7 w8"], base.device)
    end = tok.convert_tokens_to_ids("w60")
    plain = generate(base.model, tok, ids, mask, max_new_tokens=5)
    assert generate(base.model, tok, ids, mask, max_new_tokens=5, end_ids=[end],
                    end_bias=0.0) == plain
    biased = generate(base.model, tok, ids, mask, max_new_tokens=5, end_ids=[end],
                      end_bias=1e4, stop=re.compile(r"w60"))
    for b, p in zip(biased, plain):
        assert b.text == p.text.split()[0] and b.new_tokens == 2 and b.finished


def test_end_bias_favours_line_breaks_only_when_adapters_are_composed(kit):
    from composer.prompts import line_break_ids

    with open_composer(kit) as c:
        assert c._end_ids(AskConfig(mode="context")) == c._end_ids(AskConfig(mode="none")) == []
        assert c._end_ids(AskConfig()) == line_break_ids(c.base.tokenizer)
    assert line_break_ids(kit[0].tokenizer) == []  # a word-level vocabulary has none
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    lines = Tokenizer(models.WordLevel({"a": 0, "\n": 1, "<unk>": 2}, unk_token="<unk>"))
    lines.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    assert line_break_ids(PreTrainedTokenizerFast(tokenizer_object=lines)) == [1]


def test_an_ensemble_follows_its_weights_and_keeps_each_answers_rows_together(kit):
    """Weights (1, 0) decode group 0 alone and (0, 1) group 1 alone, even as rows leave the
    batch at different steps (a per-row bias ends row 0 early; the stop pattern cuts it)."""
    from composer.generation import generate

    base = kit[0]
    tok = base.tokenizer
    first, second = ["w1 w2 w3 w4 w5", "w9", "w7 w7 w8"], ["w40 w41", "w3 w3 w3 w3", "w77"]
    end, stop = [tok.convert_tokens_to_ids("w60")], re.compile(r"w60")
    ends_first_early = torch.tensor([1e4, 0.0, 0.0])

    def run(prompts, **kw):
        ids, mask = encode_prompts(tok, prompts, base.device)
        return [(g.text, g.new_tokens) for g in generate(
            base.model, tok, ids, mask, max_new_tokens=5, end_ids=end, stop=stop, **kw)]

    alone = run(first, end_bias=ends_first_early)
    assert alone[0][1] == 2 and alone[1][1] == 5  # the batch did shrink mid-way
    both_bias = torch.cat([ends_first_early, torch.zeros(3)])
    assert run(first + second, end_bias=both_bias, ensemble=(1.0, 0.0)) == alone
    assert run(first + second, ensemble=(0.0, 1.0)) == run(second)
    with pytest.raises(ValueError, match="2 rows per answer"):
        run(first, ensemble=(1.0, 1.0))


def test_ensemble_hybrid_reads_passages_without_adapters(kit):
    """The ensemble hybrid's two rows: with the passages weighted ~0 it answers as the
    parametric mode does, weighted heavily as the context mode (no adapter in that row)."""
    def ask(c, **kw):
        return [a.text for a in c.ask_batch(QUESTIONS, ["wiki"],
                                            AskConfig(k=2, max_new_tokens=4, **kw))]

    with open_composer(kit) as c:
        parametric, context = ask(c, mode="parametric"), ask(c, mode="context")
        assert parametric != context  # the two limits can be told apart
        assert ask(c, mode="hybrid", passage_weight=1e-6) == parametric
        assert ask(c, mode="hybrid", passage_weight=1e6) == context
        joint = ask(c, mode="hybrid", hybrid="joint")
        assert joint != context  # one row: the adapters change the reading


def test_ensemble_hybrid_needs_stacked_composition():
    with pytest.raises(MicroloraError, match="stacked"):
        AskConfig(mode="hybrid", composition="merged")
    assert AskConfig(mode="hybrid", hybrid="joint", composition="merged").hybrid == "joint"
    with pytest.raises(MicroloraError, match="hybrid must be one of"):
        AskConfig(hybrid="both")


def test_decoding_loop_matches_transformers_generate(arch, tmp_path):
    """The hand-written greedy loop (rows leave the batch when they end) gives exactly what
    transformers' generate gives, left padding included, on every architecture."""
    from composer.generation import generate

    base = load_base_model(save_tiny(tmp_path / arch, arch), dtype="fp32")
    tok = base.tokenizer
    ids, mask = encode_prompts(tok, ["w1 w2 w3 w4 w5", "w9", "w7 w7 w8"], base.device)
    eos = base.model.generation_config.eos_token_id
    shrinks = []
    ours = generate(base.model, tok, ids, mask, max_new_tokens=6,
                    on_rows=lambda keep: shrinks.append(keep.tolist()))
    with torch.no_grad():
        ref = base.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=6, pad_token_id=tok.pad_token_id or 0,
                                  eos_token_id=eos)
    for row, out in zip(ref[:, ids.shape[1]:].tolist(), ours):
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        assert out.text == tok.decode(row, skip_special_tokens=True).strip()
    # a stop pattern ends rows early: the batch shrinks and the survivors are unaffected
    stop = re.compile(r"w\d*[13579]\b")
    cut = generate(base.model, tok, ids, mask, max_new_tokens=6, stop=stop,
                   on_rows=lambda keep: shrinks.append(keep.tolist()))
    alone = [generate(base.model, tok, *encode_prompts(tok, [p], base.device),
                      max_new_tokens=6, stop=stop)[0]
             for p in ["w1 w2 w3 w4 w5", "w9", "w7 w7 w8"]]
    assert [c.text for c in cut] == [a.text for a in alone]
    assert [c.new_tokens for c in cut] == [a.new_tokens for a in alone]
    assert any(len(keep) < 3 for keep in shrinks)  # rows did leave the batch early


def spy_on_prompts(monkeypatch) -> list[str]:
    """The prompts generation is called with, one list per call."""
    import composer.composer as composer_module

    calls, real = [], composer_module.generate

    def spy(model, tokenizer, ids, mask, **kwargs):
        calls.append([tokenizer.decode(row[m.bool()]) for row, m in zip(ids, mask)])
        return real(model, tokenizer, ids, mask, **kwargs)

    monkeypatch.setattr(composer_module, "generate", spy)
    return calls


def test_context_mode_shows_each_atoms_window(tiny_models, tmp_path, monkeypatch):
    lm, emb_path = tiny_models
    base, emb = load_base_model(lm, dtype="fp32"), load_embedder(emb_path)
    texts = ["w1 w2 w3 w4", "w5 w6 w7", "w8 w9 w10", "w11 w12 w13 w14"]
    path = store_of_random_atoms(tmp_path / "kb", base, emb, {"wiki": texts}, paragraphs=True)
    import composer.composer as composer_module

    shown, real = [], composer_module.build_prompt
    monkeypatch.setattr(composer_module, "build_prompt", lambda tok, q, passages=(), *a:
                        shown.append(list(passages)) or real(tok, q, passages, *a))
    hits = [[Hit("wiki", "wiki-2", 0.9), Hit("wiki", "wiki-1", 0.8)]]
    with Composer(AdapterStore(path, readonly=True), base, emb) as c:
        for tokens in (0, 6, 100):
            answer = c.ask_batch(["w9 w10"], ["wiki"], AskConfig(
                mode="context", k=2, window_tokens=tokens, max_new_tokens=2), hits=hits)[0]
            assert answer.sources[0].text == "w8 w9 w10"
    alone, near, whole = shown
    assert alone == ["w8 w9 w10", "w5 w6 w7"]  # each sentence alone, in rank order
    assert near == ["w5 w6 w7 w8 w9 w10"]  # 3 + 3 tokens each: the two windows overlap
    assert whole == [" ".join(texts)]


def test_below_min_score_nothing_is_generated_and_that_is_said(kit, monkeypatch):
    prompts = spy_on_prompts(monkeypatch)
    with open_composer(kit) as c:
        strict = AskConfig(k=2, min_score=1.01, max_new_tokens=4)  # cosine is at most 1
        pieces = []
        answer = c.ask("w1 w2 w3", ["wiki"], strict, on_text=pieces.append)
        assert (answer.text, answer.found, answer.sources) == (NOTHING_FOUND, False, [])
        assert pieces == [NOTHING_FOUND] and prompts == []
        hits = c.retrieve(QUESTIONS, ["wiki"], AskConfig(k=1))
        mixed = c.ask_batch(QUESTIONS, ["wiki"], strict, hits=[hits[0], [], hits[2]])
    assert [a.found for a in mixed] == [True, False, True] and len(prompts) == 1
    assert len(prompts[0]) == 2 and mixed[1].text == NOTHING_FOUND


def test_a_gated_ensemble_lets_the_other_rows_in_only_where_the_gate_doubts():
    from composer.generation import combine

    sure = torch.tensor([[0.98, 0.01, 0.01]]).log()  # the gate's row: token 0, no doubt
    unsure = torch.tensor([[0.4, 0.3, 0.3]]).log()
    other = torch.tensor([[0.01, 0.98, 0.01]]).log()  # the adapters' row: token 1
    weights = torch.tensor([2.0, 1.0])
    assert combine(torch.stack([other, sure]), weights).argmax() == 1  # plain: other wins
    assert combine(torch.stack([other, sure]), weights, gate=1).argmax() == 0
    assert combine(torch.stack([other, unsure]), weights, gate=1).argmax() == 1
    torch.testing.assert_close(combine(torch.stack([other, unsure]), weights, gate=1),
                               2 * 0.6 * other + unsure)


class _FailsOnBoom:
    """A composer whose batches fail whenever one of their questions is "boom"."""

    def __init__(self):
        self.batches = []

    def ask_batch(self, questions, config, hits, on_text):
        from composer.composer import Answer

        self.batches.append(list(questions))
        if "boom" in questions:
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        for i, q in enumerate(questions):
            on_text(i, q.upper())
        return [Answer(q, q.upper(), config.mode) for q in questions]


def test_a_batch_where_one_row_raises_fails_that_row_alone():
    from composer.batcher import Batcher

    composer = _FailsOnBoom()
    # one batch of exactly three: it closes at max_batch, the gaps are far longer than needed
    batcher = Batcher(composer, max_batch=3, gap_s=600, max_wait_s=600)
    try:
        closed_book = AskConfig(mode="none")
        streamed = []
        ok = batcher.submit("fine", [], closed_book)
        bad = batcher.submit("boom", [], closed_book)
        also = batcher.submit("also fine", [], closed_book, streamed.append)
        assert ok.result(60).text == "FINE" and also.result(60).text == "ALSO FINE"
        with pytest.raises(RuntimeError, match="not enough memory"):
            bad.result(60)
    finally:
        batcher.close()
    assert composer.batches[0] == ["fine", "boom", "also fine"]
    assert sorted(composer.batches[1:]) == [["also fine"], ["boom"], ["fine"]]
    assert streamed == ["ALSO FINE"]


def test_an_announced_request_joins_the_batch_being_collected():
    """A batch closes after ``gap_s`` without a submission, unless a request was announced
    (``expect``: a server does as a request arrives, before parsing it); then it waits for
    that request, up to ``max_wait_s``."""
    from composer.batcher import Batcher

    composer = _FailsOnBoom()
    batcher = Batcher(composer, max_batch=8, gap_s=0.01, max_wait_s=60)
    closed_book = AskConfig(mode="none")
    try:
        arrived = batcher.expect()
        first = batcher.submit("first", [], closed_book)
        time.sleep(0.5)  # 50 gaps: without the announcement the batch would have closed
        second = batcher.submit("second", [], closed_book)
        arrived()
        arrived()  # withdrawing twice withdraws once
        assert batcher.announced == 0
        assert (first.result(60).text, second.result(60).text) == ("FIRST", "SECOND")
        alone = batcher.submit("alone", [], closed_book)  # nothing announced: closes at once
        assert alone.result(30).text == "ALONE"
    finally:
        batcher.close()
    assert composer.batches == [["first", "second"], ["alone"]]


def test_continuation_logprobs_equal_a_plain_forward(kit):
    from composer.generation import continuation_logprobs, pad_id

    base = kit[0]
    tok = base.tokenizer
    prompts, conts = ["w1 w2 w3", "w9"], [[tok.convert_tokens_to_ids("w4")],
                                          tok.convert_tokens_to_ids(["w7", "w8", "w9"])]
    ids, mask = encode_prompts(tok, prompts, base.device)
    ours = continuation_logprobs(base.model, ids, mask, conts, pad_id(tok))
    for i, (p, c) in enumerate(zip(prompts, conts)):
        row = encode_prompts(tok, [p], base.device)[0][0].tolist() + c
        with torch.no_grad():
            logp = base.model(input_ids=torch.tensor([row])).logits[0].log_softmax(-1)
        want = sum(logp[len(row) - len(c) - 1 + j, t] for j, t in enumerate(c))
        torch.testing.assert_close(ours[i], want, atol=1e-4, rtol=1e-4)


def test_the_rerank_hybrid_keeps_one_of_the_two_answers(kit):
    """Each of its answers is the adapters' (parametric) or the passages' (context) answer to
    the same question; a huge passage weight always keeps the passages' one."""
    with open_composer(kit) as c:
        hits = c.retrieve(QUESTIONS, ["wiki"], AskConfig(k=2))
        ask = dict(k=2, max_new_tokens=4, window_tokens=0)
        alone = {mode: [a.text for a in c.ask_batch(QUESTIONS, ["wiki"], AskConfig(
            mode=mode, **ask), hits=hits)] for mode in ("parametric", "context")}
        for weight in (0.0, 1.0, 1e6):
            got = [a.text for a in c.ask_batch(QUESTIONS, ["wiki"], AskConfig(
                mode="hybrid", hybrid="rerank", passage_weight=weight, **ask), hits=hits)]
            assert all(g in pair for g, pair in zip(got, zip(*alone.values())))
            if weight == 1e6:
                assert got == alone["context"]


def test_the_names_a_question_names_and_their_penalty(kit):
    from composer.composer import question_names
    from composer.generation import generate

    assert question_names("Who guided Honor Voss across the Red Sands?") == {"Honor", "Red"}
    assert question_names("In which year did The Tinker Box open?") == {"Tinker"}
    assert question_names("Where was it built?") == set()
    base = kit[0]
    tok = base.tokenizer
    ids, mask = encode_prompts(tok, ["w1 w2 w3"], base.device)
    first = generate(base.model, tok, ids, mask, max_new_tokens=1)[0].text
    vocab = base.model.get_output_embeddings().weight.shape[0]
    bias = torch.zeros(1, vocab)
    bias[0, tok.convert_tokens_to_ids(first)] = -1e4
    other = generate(base.model, tok, ids, mask, max_new_tokens=1, logit_bias=bias)[0].text
    assert other and other != first


def test_the_output_layer_gets_a_contiguous_batch(kit):
    """The prefill's last positions go through the output layer as one matrix product, not
    a bmm over the weight expanded per row (``generation.contiguous_output_layer``)."""
    from composer.generation import continuation_logprobs, generate, pad_id

    base = kit[0]
    tok = base.tokenizer
    seen = []
    def standard(x):  # contiguous with the strides its shape implies (one row's slice is
        # is_contiguous() whatever its strides, and a bf16 product read them: 35x slower)
        return x.stride() == torch.empty(x.shape).stride()

    hook = base.model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append((args[0].shape[0], standard(args[0]))))
    ids, mask = encode_prompts(tok, QUESTIONS, base.device)
    one, one_mask = encode_prompts(tok, QUESTIONS[:1], base.device)
    try:
        generate(base.model, tok, ids, mask, max_new_tokens=2, min_new_tokens=2)
        continuation_logprobs(base.model, ids, mask, [[5], [6, 7], [8]], pad_id(tok))
        # one row: its last position's slice keeps the prompt's strides unless copied
        generate(base.model, tok, one, one_mask, max_new_tokens=1)
    finally:
        hook.remove()
    assert len(seen) == 4 and all(n == len(QUESTIONS) and ok for n, ok in seen[:3])
    assert seen[3] == (1, True)
