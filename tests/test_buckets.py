"""Rows grouped by length (compiler.buckets) and the trainer run group by group."""

import itertools

import pytest
import torch
from test_trainer import KEYS, TEXTS, base, config  # noqa: F401  (base: a fixture)

from compiler.buckets import length_groups
from compiler.trainer import AtomTrainer


def padded_cost(lengths, groups, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


@pytest.mark.parametrize("most", [1, 2, 3])
def test_groups_cover_every_row_once_at_the_least_padding_brute_force_finds(most):
    lengths = torch.tensor([30, 31, 62, 33, 64, 12, 12, 13, 45, 30])
    groups = length_groups(lengths, most, overhead=20)
    assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
    assert len(groups) <= most
    ordered = torch.argsort(lengths, stable=True).tolist()
    best = min(padded_cost(lengths.tolist(), [ordered[i:j] for i, j in
                                              zip((0, *cuts), (*cuts, len(lengths)))], 20)
               for k in range(most) for cuts in itertools.combinations(range(1, len(lengths)), k))
    assert padded_cost(lengths.tolist(), [g.tolist() for g in groups], 20) == best


def test_one_group_keeps_the_rows_in_order_and_equal_lengths_are_not_split():
    assert length_groups(torch.tensor([5, 3, 9]), 1)[0].tolist() == [0, 1, 2]
    assert length_groups(torch.tensor([5, 3, 9]), 3, overhead=100)[0].tolist() == [0, 1, 2]
    assert len(length_groups(torch.tensor([20] * 8), 3, overhead=1)) == 1


@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_training_group_by_group_gives_the_adapters_one_padded_forward_gives(base, distill):  # noqa: F811
    """Rows of very different lengths (texts and question views), composed with neighbours,
    with and without a teacher's targets: the same atoms, steps and losses whether a step
    runs one padded forward and backward or one per group."""
    texts = [TEXTS[0], "w1 " * 150, TEXTS[1], "w7 w8 " * 60]
    views = [[("q1 q2", "w5")], [], [("q3 q4 q5 q6 q7 q8 q9 q10 q11 q12", "w9 w9")], []]
    windows = [f"w{i} w{i + 1} w{i + 2}" for i in range(len(texts))]

    def run(groups):
        cfg = config(neighbours=1, max_steps=6, stop_prob=0.99, length_groups=groups,
                     distill=distill)
        with AtomTrainer(base.model, base.tokenizer, cfg) as trainer:
            return trainer.train(texts, KEYS, views=views, windows=windows)

    assert len(length_groups(torch.tensor([5, 150, 3, 120, 4, 13]), 3)) > 1  # it does split
    one, several = run(1), run(3)
    for a, b in zip(one, several):
        assert a.steps == b.steps
        assert a.final_loss == pytest.approx(b.final_loss, rel=1e-4)
        torch.testing.assert_close(a.adapter.flat, b.adapter.flat, atol=1e-5, rtol=1e-4)
