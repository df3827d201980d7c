"""The batched atom trainer on a tiny random Gemma."""

import pytest
import torch
from conftest import save_tiny

from compiler.trainer import AtomTrainer, rows_of
from microlora.core.config import TargetSpec, TrainConfig
from microlora.core.kernel import MultiLoraModel
from microlora.core.models import load_base_model
from microlora.core.pack import compose

TEXTS = ["w1 w2 w3 w4 w5", "w9 w8 w7", "w3 w3 w3 w3 w1 w2", "w40 w41 w42 w43"]
KEYS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return load_base_model(save_tiny(tmp_path_factory.mktemp("m") / "tiny", "gemma"), dtype="fp32")


def config(**kw):
    defaults = dict(rank=2, targets=TargetSpec(last_layers=2), lr=2e-2, bf16=False, neighbours=0,
                    vocab_candidates=0)
    return TrainConfig(**{**defaults, **kw})


def train(base, texts=TEXTS, keys=KEYS, **kw):
    with AtomTrainer(base.model, base.tokenizer, config(**kw)) as trainer:
        return trainer.train(texts, keys)


def full_loss(base, text, adapter, *beside, weights=None) -> float:
    """The stock HF loss of ``text`` (the tiny tokenizer adds no BOS) with ``adapter`` alone, or
    composed with ``beside`` (each atom weighted by ``weights``)."""
    ids = base.tokenizer(text, return_tensors="pt").input_ids
    lora = MultiLoraModel(base.model, config().targets)
    try:
        with torch.no_grad(), lora.adapters(compose([[adapter, *beside]], weights)):
            return base.model(input_ids=ids, labels=ids).loss.item()
    finally:
        lora.remove()


def test_training_lowers_every_atoms_loss_and_leaves_the_base_alone(base):
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    initial = train(base, stop_prob=0.0)  # everyone "passes" at step 0: the untrained loss
    trained = train(base, max_steps=40, stop_prob=0.99)
    assert all(a.steps == 0 for a in initial)
    for first, last in zip(initial, trained):
        assert last.final_loss < 0.5 * first.final_loss
    after = base.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_trained_adapter_reproduces_the_recorded_loss(base):
    atom = train(base, texts=TEXTS[:1], keys=KEYS[:1], max_steps=15, stop_prob=0.99)[0]
    assert full_loss(base, TEXTS[0], atom.adapter) == pytest.approx(atom.final_loss, rel=1e-4)


def test_batched_equals_alone_without_composition(base):
    together = train(base, max_steps=8, stop_prob=0.99)
    for i in range(len(TEXTS)):
        alone = train(base, texts=[TEXTS[i]], keys=[KEYS[i]], max_steps=8, stop_prob=0.99)[0]
        assert alone.steps == together[i].steps
        assert together[i].adapter.layout == alone.adapter.layout
        torch.testing.assert_close(together[i].adapter.flat, alone.adapter.flat, atol=2e-5,
                                   rtol=1e-4)


def test_adaptive_budget_stops_atoms_that_have_learned(base):
    out = train(base, max_steps=60, stop_prob=0.5)
    early = [a for a in out if a.steps < 60]
    assert early, "some atom should reach p > 0.5 on every token within 60 steps"
    # p > 0.5 on every target token means a mean cross-entropy below ln 2
    assert all(a.final_loss < 0.6932 for a in early)
    capped = train(base, max_steps=3, stop_prob=0.999)
    assert [a.steps for a in capped] == [3] * 4


def test_composition_in_the_loop_is_deterministic_and_changes_training(base):
    plain = train(base, max_steps=5, stop_prob=0.99)
    composed = train(base, max_steps=5, stop_prob=0.99, neighbours=2)
    again = train(base, max_steps=5, stop_prob=0.99, neighbours=2)
    assert not torch.allclose(plain[0].adapter.flat, composed[0].adapter.flat)
    assert all(torch.equal(a.adapter.flat, b.adapter.flat) for a, b in zip(composed, again))


def test_frozen_store_neighbours_are_composed(base):
    cfg = config(max_steps=5, stop_prob=0.99)
    with AtomTrainer(base.model, base.tokenizer, cfg) as trainer:
        neighbour = trainer.train(TEXTS[3:], KEYS[3:])[0].adapter
        alone = trainer.train(TEXTS[:2], KEYS[:2])
        beside = trainer.train(TEXTS[:2], KEYS[:2], frozen_neighbours=[[neighbour], []])
    assert not torch.allclose(alone[0].adapter.flat, beside[0].adapter.flat)
    torch.testing.assert_close(alone[1].adapter.flat, beside[1].adapter.flat)


def test_the_scale_is_folded_into_the_returned_adapter(base):
    """scale s trains W + s·BA; what comes back is (A, s·B): the delta the store keeps."""
    one = train(base, texts=TEXTS[:1], keys=KEYS[:1], max_steps=6, stop_prob=0.99)[0]
    two = train(base, texts=TEXTS[:1], keys=KEYS[:1], max_steps=6, stop_prob=0.99, scale=2.0)[0]
    assert full_loss(base, TEXTS[0], two.adapter) == pytest.approx(two.final_loss, rel=1e-4)
    assert not torch.allclose(one.adapter.flat, two.adapter.flat)


def test_bad_recipes_name_the_flag():
    with pytest.raises(ValueError, match="--rank"):
        TrainConfig(rank=3)
    with pytest.raises(ValueError, match="--company-weight"):
        TrainConfig(company_weight="sum")
    with pytest.raises(ValueError, match="--steps"):
        TrainConfig(max_steps=0)


def test_candidate_vocabulary_trains_nearly_as_well_and_scores_with_the_full_softmax(base):
    full = train(base, max_steps=30, stop_prob=0.99)
    candidates = train(base, max_steps=30, stop_prob=0.99, vocab_candidates=8)
    for f, c in zip(full, candidates):
        assert c.final_loss < 1.5 * f.final_loss + 0.05
    # the recorded loss is the full-softmax loss of the returned adapter
    atom = train(base, texts=TEXTS[:1], keys=KEYS[:1], max_steps=10, stop_prob=0.99,
                 vocab_candidates=8)[0]
    assert full_loss(base, TEXTS[0], atom.adapter) == pytest.approx(atom.final_loss, rel=1e-4)


def test_question_views_train_the_atoms_own_adapter(base):
    """An atom trained on its views answers them (their loss falls with its own adapter) and
    its views count towards whether it has learned; the other atoms are unaffected by them."""
    views = [[("w10 w11 w12", " w5"), ("w13 w14", " w1 w2")], [], [], []]
    with AtomTrainer(base.model, base.tokenizer, config(max_steps=30, stop_prob=0.9)) as t:
        with_views = t.train(TEXTS, KEYS, views=views)
        plain = t.train(TEXTS, KEYS)
    for i in (1, 2, 3):  # no views: trained as without (neighbours 0; batch shapes differ)
        assert with_views[i].steps == plain[i].steps
        torch.testing.assert_close(with_views[i].adapter.flat, plain[i].adapter.flat,
                                   atol=1e-5, rtol=1e-4)
    def answer_prob(adapter) -> float:  # p(" w5" | "w10 w11 w12") with the atom's adapter
        ids = base.tokenizer("w10 w11 w12 w5", return_tensors="pt").input_ids
        lora = MultiLoraModel(base.model, config().targets)
        try:
            with torch.no_grad(), lora.adapters(compose([[adapter]])):
                logits = base.model(input_ids=ids).logits[0, -2]
        finally:
            lora.remove()
        return logits.softmax(-1)[ids[0, -1]].item()

    trained, untrained = answer_prob(with_views[0].adapter), answer_prob(plain[0].adapter)
    assert trained > 0.2 and trained > 5 * untrained, (trained, untrained)


def test_stop_on_answers_lets_an_atom_stop_once_its_views_are_answered(base):
    """``stop_on="answers"``: an atom with views stops as soon as their answers pass
    ``stop_prob``, its sentence still unlearned, where by default it trains on to learn every
    target; an atom without views is decided by its sentence either way."""
    views = [[("w10 w11 w12", " w5")], [], [], []]
    runs = {}
    for stop_on in ("targets", "answers"):
        with AtomTrainer(base.model, base.tokenizer,
                         config(max_steps=60, stop_prob=0.3, stop_on=stop_on)) as t:
            runs[stop_on] = t.train(TEXTS, KEYS, views=views)
    answered, whole = runs["answers"][0], runs["targets"][0]
    assert answered.steps < whole.steps
    assert answer_argmax(base, "w10 w11 w12", " w5", answered.adapter) == \
        base.tokenizer(" w5", add_special_tokens=False).input_ids
    assert full_loss(base, TEXTS[0], answered.adapter) > full_loss(base, TEXTS[0], whole.adapter)
    for plain, decided in zip(runs["targets"][1:], runs["answers"][1:]):
        assert decided.steps == plain.steps  # no views: the sentence decides, as before


def answer_argmax(base, prompt: str, answer: str, adapter=None) -> list[int]:
    """The model's likeliest token at each of ``answer``'s positions after ``prompt``."""
    bos = [base.tokenizer.bos_token_id] if base.tokenizer.bos_token_id is not None else []
    p = bos + base.tokenizer(prompt, add_special_tokens=False).input_ids
    a = base.tokenizer(answer, add_special_tokens=False).input_ids
    ids = torch.tensor([p + a])
    lora = MultiLoraModel(base.model, config().targets)
    try:
        with torch.no_grad(), lora.adapters(compose([[adapter]]) if adapter else {}):
            logits = base.model(input_ids=ids).logits[0]
    finally:
        lora.remove()
    return logits[len(p) - 1:len(p) + len(a) - 1].argmax(-1).tolist()


def test_distillation_teaches_what_the_base_model_says_with_the_window_in_view(base):
    """distill=1: a view's answer is taught as the frozen model predicts it reading the
    atom's window first, not as the answer's own tokens: trained, the bare question gets
    the teacher's answer tokens."""
    views = [[("w5 w6 w7", " w8 w9 w10")], [("w11 w12", " w13 w14")]]
    windows = ["w20 w21 w22 w23", "w30 w31 w32"]
    cfg = config(distill=1.0, distill_topk=8, max_steps=60, stop_prob=0.99)
    with AtomTrainer(base.model, base.tokenizer, cfg) as trainer:
        trained = trainer.train(TEXTS[:2], KEYS[:2], views=views, windows=windows)
    for (question, answer), window, atom in zip([v[0] for v in views], windows, trained):
        teacher = answer_argmax(base, f"Context: {window}\n{question}", answer)
        assert teacher != base.tokenizer(answer, add_special_tokens=False).input_ids
        assert answer_argmax(base, question, answer, atom.adapter) == teacher
        assert answer_argmax(base, question, answer) != teacher  # the adapter did it


def test_the_teacher_reads_each_window_once_and_predicts_as_a_whole_row_does(arch, tmp_path):
    """Views continue from their atom's window's keys and values (read once per atom, left
    padded, once for all the atoms that share it): the teacher's tokens and mass are those
    of one plain forward over window, question and answer, for windows of different lengths,
    atoms with 0, 1 or 2 views and two atoms with one window, also where a row is longer than
    the tiny Gemma's sliding window (8)."""
    from compiler.loss import encode_targets

    tiny = load_base_model(save_tiny(tmp_path / arch, arch), dtype="fp32")
    windows = ["w20 w21 w22 w23 w24 w25 w26 w27 w28 w29", "w30", "w40 w41 w42", "w30"]
    views = [[("w5 w6 w7", " w8 w9 w10"), ("w1 w2", " w3")], [], [("w11 w12", " w13 w14")],
             [("w15", " w16 w17")]]
    texts = [t for _, t in (v for vs in views for v in vs)]
    contexts = [c for c, _ in (v for vs in views for v in vs)]
    group = [0, 1, 2, 3, 0, 0, 2, 3]  # rows: the 4 atoms' texts, then their views in order
    cfg = config(distill=0.5, distill_topk=4)
    with AtomTrainer(tiny.model, tiny.tokenizer, cfg) as trainer:
        row_texts = TEXTS + texts
        _, _, tgt = encode_targets(tiny.tokenizer, row_texts, [""] * 4 + contexts, tiny.device)
        soft = trainer._teacher(row_texts, [""] * 4 + contexts, group, 4, windows,
                                tgt[:, 1:].nonzero()[:, 0])
    read = [f"Context: {windows[group[4 + j]]}\n{c}" for j, c in enumerate(contexts)]
    ids, mask, vt = encode_targets(tiny.tokenizer, texts, read, tiny.device)
    with torch.no_grad():
        logits = tiny.model(input_ids=ids, attention_mask=mask).logits[:, :-1][vt[:, 1:]]
    top = torch.softmax(logits, -1).topk(4)
    taught = soft.probs.sum(1) > 0
    assert taught.sum() == len(logits)  # the views' targets, and no text's
    assert torch.equal(soft.ids[taught], top.indices)
    torch.testing.assert_close(soft.probs[taught],
                               top.values / top.values.sum(1, keepdim=True) * 0.5)


def test_nearest_company_picks_the_most_similar_batch_mates():
    import numpy as np

    from compiler.pipeline import nearest_company

    vectors = np.eye(4, dtype=np.float32)
    vectors[1] = vectors[0] * 0.8 + vectors[1] * 0.6  # 1 is near 0
    vectors[3] = vectors[2] * 0.6 + vectors[3] * 0.8  # 3 is near 2
    company = nearest_company(vectors, 1)
    assert company[:, 0].tolist() == [1, 0, 3, 2]
    assert nearest_company(vectors, 9).shape == (4, 3)  # never more than the others


def test_given_company_is_who_trains_beside_an_atom(base):
    """With a company, atom 0 trains beside atom 1 only: changing atom 2 or 3 (not its
    company) leaves atom 0's adapter as it was; changing atom 1 does not."""
    company = torch.tensor([[1], [0], [3], [2]])

    def atom0(texts):
        with AtomTrainer(base.model, base.tokenizer, config(neighbours=1, max_steps=5,
                                                            stop_prob=1.0)) as trainer:
            return trainer.train(texts, KEYS, company=company)[0].adapter.flat

    first = atom0(TEXTS)
    same = atom0(TEXTS[:2] + ["w50 w51", "w52 w53 w54"])
    other = atom0([TEXTS[0], "w60 w61 w62"] + TEXTS[2:])
    torch.testing.assert_close(first, same, atol=1e-6, rtol=1e-5)  # padding may differ
    assert (first - other).abs().max() > 1e-3


@pytest.mark.parametrize("weighting", ["one", "mean"])
def test_an_atom_trains_in_its_company_at_the_weight_it_is_composed_with(base, weighting):
    """Atoms 0 and 1 train beside each other: their recorded loss is the loss of the two
    composed at 1 each (the sum) or at 1/2 each (their mean), as ``--company-weight`` says."""
    company = torch.tensor([[1], [0], [3], [2]])
    cfg = config(neighbours=1, max_steps=6, stop_prob=1.0, company_weight=weighting)
    with AtomTrainer(base.model, base.tokenizer, cfg) as trainer:
        out = trainer.train(TEXTS, KEYS, company=company)
    w = 1.0 if weighting == "one" else 0.5
    composed = full_loss(base, TEXTS[0], out[0].adapter, out[1].adapter, weights=[[w, w]])
    assert composed == pytest.approx(out[0].final_loss, rel=1e-4)
    other = full_loss(base, TEXTS[0], out[0].adapter, out[1].adapter,
                      weights=[[1.5 - w, 1.5 - w]])
    assert other != pytest.approx(out[0].final_loss, rel=1e-2)


@pytest.mark.parametrize("index", [[2, 0, 2, 2, 1], [[1, 3], [3, 3], [0, 1]]])
def test_rows_of_gathers_and_back_propagates_as_indexing_does(index):
    """The trainer gathers adapters with ``rows_of`` (its backward adds, where indexing's
    puts with accumulation): the same values and the same gradient, repeated rows summed."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, requires_grad=True)
    idx = torch.tensor(index)
    upstream = torch.randn(*idx.shape, 3, 5)
    ours = rows_of(x, idx)
    (grad_ours,) = torch.autograd.grad(ours, x, upstream)
    theirs = x[idx]
    (grad_theirs,) = torch.autograd.grad(theirs, x, upstream)
    assert torch.equal(ours, theirs)
    assert torch.allclose(grad_ours, grad_theirs)
    gathered = torch.zeros(4, dtype=torch.bool)
    gathered[idx.reshape(-1)] = True
    assert (grad_ours.abs().sum((1, 2)) > 0).equal(gathered)  # a row not gathered gets none
