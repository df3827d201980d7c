"""The batched atom trainer on a tiny random Gemma."""

import pytest
import torch
from conftest import save_tiny

from compiler.trainer import AtomTrainer, TrainConfig
from microlora.lora import MultiLoraModel, stack_adapters
from microlora.models import load_base_model
from microlora.targets import TargetSpec

TEXTS = ["w1 w2 w3 w4 w5", "w9 w8 w7", "w3 w3 w3 w3 w1 w2", "w40 w41 w42 w43"]
KEYS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return load_base_model(save_tiny(tmp_path_factory.mktemp("m") / "tiny", "gemma"))


def config(**kw):
    defaults = dict(targets=TargetSpec(last_layers=2), lr=2e-2, bf16=False, neighbours=0,
                    vocab_candidates=0)
    return TrainConfig(**{**defaults, **kw})


def train(base, texts=TEXTS, keys=KEYS, **kw):
    with AtomTrainer(base.model, base.tokenizer, config(**kw)) as trainer:
        return trainer.train(texts, keys)


def full_loss(base, text, adapter) -> float:
    """The stock HF loss of ``text`` (the tiny tokenizer adds no BOS) with ``adapter`` alone."""
    ids = base.tokenizer(text, return_tensors="pt").input_ids
    lora = MultiLoraModel(base.model, config().targets)
    try:
        with torch.no_grad(), lora.adapters(stack_adapters([[adapter]])):
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
        for name, (A, B) in alone.adapter.items():
            torch.testing.assert_close(together[i].adapter[name][0], A, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(together[i].adapter[name][1], B, atol=2e-5, rtol=1e-4)


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
    name = next(iter(plain[0].adapter))
    assert not torch.allclose(plain[0].adapter[name][1], composed[0].adapter[name][1])
    assert all(torch.equal(a.adapter[name][1], b.adapter[name][1])
               for a, b in zip(composed, again))


def test_frozen_store_neighbours_are_composed(base):
    cfg = config(max_steps=5, stop_prob=0.99)
    with AtomTrainer(base.model, base.tokenizer, cfg) as trainer:
        neighbour = trainer.train(TEXTS[3:], KEYS[3:])[0].adapter
        alone = trainer.train(TEXTS[:2], KEYS[:2])
        beside = trainer.train(TEXTS[:2], KEYS[:2], frozen_neighbours=[[neighbour], []])
    name = next(iter(neighbour))
    assert not torch.allclose(alone[0].adapter[name][1], beside[0].adapter[name][1])
    torch.testing.assert_close(alone[1].adapter[name][1], beside[1].adapter[name][1])


def test_bad_recipes_name_the_flag():
    with pytest.raises(ValueError, match="--rank"):
        TrainConfig(rank=3)
    with pytest.raises(ValueError, match="--steps"):
        TrainConfig(max_steps=0)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_linear_cross_entropy_matches_the_plain_loss_and_gradient(softcap):
    from compiler.trainer import _LOSS_CHUNK_ROWS, linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    n = _LOSS_CHUNK_ROWS + 37  # more than one chunk
    h = torch.randn(n, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 300, (n,), generator=g)
    weights = torch.rand(n, generator=g)  # an arbitrary upstream gradient

    ours = linear_cross_entropy(h, w, labels, softcap)
    (ours * weights).sum().backward()
    grad_ours, h.grad = h.grad.clone(), None

    logits = h @ w.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    plain = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    (plain * weights).sum().backward()
    torch.testing.assert_close(ours, plain.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours, h.grad, atol=1e-5, rtol=1e-5)


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
        for name, (A, B) in plain[i].adapter.items():
            torch.testing.assert_close(with_views[i].adapter[name][0], A, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(with_views[i].adapter[name][1], B, atol=1e-5, rtol=1e-4)
    def answer_prob(adapter) -> float:  # p(" w5" | "w10 w11 w12") with the atom's adapter
        ids = base.tokenizer("w10 w11 w12 w5", return_tensors="pt").input_ids
        lora = MultiLoraModel(base.model, config().targets)
        try:
            with torch.no_grad(), lora.adapters(stack_adapters([[adapter]])):
                logits = base.model(input_ids=ids).logits[0, -2]
        finally:
            lora.remove()
        return logits.softmax(-1)[ids[0, -1]].item()

    trained, untrained = answer_prob(with_views[0].adapter), answer_prob(plain[0].adapter)
    assert trained > 0.2 and trained > 5 * untrained, (trained, untrained)


def test_new_recipe_fields_at_their_default_keep_atom_ids():
    assert "qa_views" not in TrainConfig(qa_views=0).key()  # as before the field existed
    assert TrainConfig(qa_views=2).key() != TrainConfig(qa_views=0).key()
    assert "view_style" not in TrainConfig(view_style="sentence").key()
    assert TrainConfig(view_style="clause").key() != TrainConfig(view_style="sentence").key()
    with pytest.raises(ValueError, match="view-style"):
        TrainConfig(view_style="paragraph")


def test_question_views_of_a_sentence():
    from compiler.views import question_views

    views = question_views("Madge Blake was born in Kinsley, Kansas in 1899.", 4)
    assert ("Question: Who was born in Kinsley, Kansas in 1899?\nAnswer:", " Madge Blake\n") \
        in views
    assert any(answer == " 1899\n" and "when" in q for q, answer in views)
    assert len(views) == 4 and question_views("no names here at all.", 2) == []
    assert len(question_views("Madge Blake was born in Kinsley, Kansas in 1899.", 2)) == 2


def test_clause_views_ask_with_the_clause_around_the_answer():
    from compiler.views import question_views

    sentence = ("Rajeshwari Sachdev voices Bumblebee , an Autobot scout and Optimus Prime 's "
                "second - in - command , who transforms into a custom - built yellow and black "
                "2016 Chevrolet Camaro .")
    views = dict((a.strip(), q) for q, a in question_views(sentence, 4, "clause"))
    # the clause (grown to a few words), not the whole sentence; " - " does not end a clause
    assert views["Rajeshwari Sachdev"] == ("Question: Who voices Bumblebee , an Autobot scout "
                                           "and Optimus Prime 's second - in - command?\nAnswer:")
    assert "Camaro" not in views["Optimus Prime"] and "Sachdev" not in views["Optimus Prime"]
    # a leading title stays in the question; brackets the cut left unmatched are dropped
    views = dict((a.strip(), q) for q, a in question_views(
        "It was a war , which led President Lauren Lapkus ( a Democrat ) to proclaim it .", 2,
        "clause"))
    assert "led President who" in views["Lauren Lapkus"]
    for question in views.values():
        assert question.count("(") == question.count(")"), question
    # the sentence style is unchanged: stores compiled before the clause style keep their atoms
    assert question_views(sentence, 1) == question_views(sentence, 1, "sentence")
    with pytest.raises(ValueError):
        question_views(sentence, 1, "paragraph")
