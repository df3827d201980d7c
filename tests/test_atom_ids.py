"""Atom ids are content hashes that users' stores are keyed by: if one byte of the recipe key
or of the id changes, every existing store retrains from scratch. These values were computed
before the ground-floor refactor and must never move silently."""

import pytest

from compiler.chunking import Atom
from compiler.pipeline import atom_id
from microlora.core.config import TrainConfig

SENTENCE = Atom(text="Brightwater Clockworks was founded by Ada Quorne in 1871.", source="x.md",
                start=0, end=10, title="Brightwater")
FINGERPRINT = "f" * 64

# TrainConfig() as of stop 12 (2026-12): rank 2, 25 steps, 2 sentence-style question views,
# no distillation (the default since stop 28, which gives new ids), no subject context (the
# default "embedding" since stop 29 gives new ids too).
V1_DEFAULTS = dict(rank=2, scale=1.0, lr=5e-3, max_steps=25, stop_prob=0.5, neighbours=3, seed=0,
                   bf16=True, title_context=False, vocab_candidates=256, neighbours_learn=False,
                   qa_views=2, view_style="sentence", distill=0.0, subject_context="off")
V1_KEY = ('{"bf16": true, "lr": 0.005, "max_steps": 25, "neighbours": 3, "neighbours_learn": '
          'false, "qa_views": 2, "rank": 2, "scale": 1.0, "seed": 0, "stop_prob": 0.5, "targets":'
          ' {"last_layers": 6, "layers": null, "modules": ["mlp.*"]}, "title_context": false, '
          '"vocab_candidates": 256}')


def test_the_recipe_key_of_stored_atoms_is_unchanged():
    assert TrainConfig(**V1_DEFAULTS).key() == V1_KEY


def test_atom_ids_are_unchanged():
    assert atom_id(SENTENCE, FINGERPRINT, TrainConfig(**V1_DEFAULTS)) == \
        "11a6e7bd2bccaf52e2771ccebe45fff0"
    other = TrainConfig(**{**V1_DEFAULTS, "qa_views": 0, "view_style": "clause", "rank": 1})
    assert atom_id(SENTENCE, FINGERPRINT, other) == "3aacb9bc63e95fdf57b30e94208d640f"


def test_batch_size_does_not_change_what_an_atom_is():
    assert TrainConfig(**V1_DEFAULTS, batch_atoms=7).key() == V1_KEY


def test_new_recipe_fields_at_their_default_keep_atom_ids():
    assert "qa_views" not in TrainConfig(qa_views=0).key()  # as before the field existed
    assert TrainConfig(qa_views=2).key() != TrainConfig(qa_views=0).key()
    assert "view_style" not in TrainConfig(view_style="sentence").key()
    assert TrainConfig(view_style="clause").key() != TrainConfig(view_style="sentence").key()
    assert "distill" not in TrainConfig(distill=0.0).key()
    assert TrainConfig().key() != TrainConfig(distill=0.0).key()  # today's default retrains
    assert "subject_context" not in TrainConfig(subject_context="off").key()
    assert TrainConfig().key() != TrainConfig(subject_context="off").key()
    assert "stop_on" not in TrainConfig(stop_on="targets").key()
    assert TrainConfig(stop_on="answers").key() != TrainConfig().key()
    with pytest.raises(ValueError, match="stop-on"):
        TrainConfig(stop_on="sentence")
    with pytest.raises(ValueError, match="view-style"):
        TrainConfig(view_style="paragraph")
