"""The fused output-layer loss: the same values and gradients as the plain cross-entropy."""

import pytest
import torch

from compiler.loss import LOSS_CHUNK_ROWS, linear_cross_entropy


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_linear_cross_entropy_matches_the_plain_loss_and_gradient(softcap):
    g = torch.Generator().manual_seed(0)
    n = LOSS_CHUNK_ROWS + 37  # more than one chunk
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
