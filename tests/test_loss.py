"""The fused output-layer loss: the same values and gradients as the plain cross-entropy."""

import pytest
import torch

from compiler.loss import (
    LOSS_CHUNK_ROWS,
    OutputHead,
    SoftTargets,
    linear_cross_entropy,
    logsumexp_,
)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_linear_cross_entropy_matches_the_plain_loss_and_gradient(softcap):
    g = torch.Generator().manual_seed(0)
    n = LOSS_CHUNK_ROWS + 37  # more than one chunk
    h = torch.randn(n, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 300, (n,), generator=g)
    weights = torch.rand(n, generator=g)  # an arbitrary upstream gradient

    ours, gold = linear_cross_entropy(h, w, labels, softcap)
    (ours * weights).sum().backward()
    grad_ours, h.grad = h.grad.clone(), None

    logits = h @ w.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    plain = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    (plain * weights).sum().backward()
    torch.testing.assert_close(ours, plain.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gold, plain.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_soft_targets_give_the_cross_entropy_against_the_mixture(softcap):
    """Distillation: the loss and gradient are the plain cross-entropy against
    (1 - mix) * one_hot(label) + mix * teacher; the second output is the label's alone."""
    g = torch.Generator().manual_seed(1)
    n, vocab, k, mix = LOSS_CHUNK_ROWS + 11, 300, 5, 0.7
    h = torch.randn(n, 16, generator=g, requires_grad=True)
    w = torch.randn(vocab, 16, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    probs = torch.softmax(torch.randn(n, k, generator=g), 1)
    weights = torch.rand(n, generator=g)

    ours, gold = linear_cross_entropy(h, w, labels, softcap, SoftTargets(ids, mix * probs))
    (ours * weights).sum().backward()
    grad_ours, h.grad = h.grad.clone(), None

    logits = h @ w.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    target = (1 - mix) * torch.nn.functional.one_hot(labels, vocab).float()
    target.scatter_add_(1, ids, mix * probs)
    plain = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    (plain * weights).sum().backward()
    torch.testing.assert_close(ours, plain.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours, h.grad, atol=1e-5, rtol=1e-5)
    label_only = torch.nn.functional.cross_entropy(logits.detach(), labels, reduction="none")
    torch.testing.assert_close(gold, label_only, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_without_a_gradient_the_loss_is_the_same_computed_in_the_logits_memory(softcap):
    """Scoring (no gradient) takes the logsumexp in the logits' own memory: same losses."""
    g = torch.Generator().manual_seed(2)
    n, vocab, k = LOSS_CHUNK_ROWS + 5, 300, 4
    h = torch.randn(n, 16, generator=g)
    w = torch.randn(vocab, 16, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    soft = SoftTargets(torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)]),
                       0.5 * torch.softmax(torch.randn(n, k, generator=g), 1))
    with torch.no_grad():
        scored = linear_cross_entropy(h, w, labels, softcap, soft)
    trained = linear_cross_entropy(h.clone().requires_grad_(), w, labels, softcap, soft)
    for a, b in zip(scored, trained):
        torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=1e-5)


def test_the_heads_top_tokens_are_the_full_softmaxs():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(LOSS_CHUNK_ROWS + 9, 16, generator=g), torch.randn(300, 16, generator=g)
    head = OutputHead(w, softcap=None)
    ids, probs = head.top(h, 5)
    want = torch.softmax(h @ w.T, -1).topk(5)
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(probs, want.values, atol=1e-6, rtol=1e-5)
    x = torch.randn(3, 7, generator=g) * 30
    torch.testing.assert_close(logsumexp_(x.clone()), torch.logsumexp(x, -1))
