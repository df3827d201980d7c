"""The one adapter form: packing is views, and ``compose`` gives the kernel exactly the
weighted sum of the atoms' deltas, for ragged requests, mixed layouts and a shared adapter."""

import pytest
import torch
from conftest import random_adapter

from microlora.core.errors import AdapterError
from microlora.core.pack import Packed, PackLayout, compose, concat

SHAPES = {"l.0.up": (6, 10), "l.0.gate": (6, 10), "l.0.down": (10, 6),
          "l.1.up": (6, 10), "l.1.down": (10, 6)}


def delta(batched, name, n):
    """Request n's composed delta for one module: B (out, R) @ A (R, in)."""
    A, B = batched[name]
    return B[n] @ A[n]


def reference(atoms, weights=None):
    """The weighted sum of the atoms' deltas, module by module, computed by hand."""
    out = {}
    for i, atom in enumerate(atoms):
        w = 1.0 if weights is None else weights[i]
        for name, (A, B) in atom.items():
            out[name] = out.get(name, 0) + w * (B @ A)
    return out


def test_pack_round_trip_is_views():
    adapter = random_adapter(SHAPES, rank=2, seed=5)
    packed = Packed.of(adapter)
    assert packed.flat.shape == (packed.layout.size,) and packed.rank == 2
    for name, (A, B) in packed.unpack().items():
        assert torch.equal(A, adapter[name][0]) and torch.equal(B, adapter[name][1])
        assert B.untyped_storage().data_ptr() == packed.flat.untyped_storage().data_ptr()


@pytest.mark.parametrize("weighted", [False, True])
def test_compose_sums_the_weighted_deltas_of_ragged_requests(weighted):
    pool = [random_adapter(SHAPES, rank=2, seed=s) for s in range(5)]
    requests = [[0, 1, 2], [], [3], [4, 0]]
    weights = [[1.0, 0.5, 0.25], [], [2.0], [0.0, 1.0]] if weighted else None
    composed = compose([[Packed.of(pool[i]) for i in row] for row in requests], weights)
    assert {A.shape[:2] for A, _ in composed.values()} == {(4, 6)}  # padded to 3 atoms x r 2
    for n, row in enumerate(requests):
        want = reference([pool[i] for i in row], weights[n] if weighted else None)
        for name in SHAPES:
            got = delta(composed, name, n)
            torch.testing.assert_close(got, want.get(name, torch.zeros_like(got)))


def test_compose_mixes_layouts_and_puts_the_shared_adapter_in_every_request():
    rank2 = random_adapter(SHAPES, rank=2, seed=1)
    rank1_few = random_adapter({k: SHAPES[k] for k in ("l.0.up", "l.1.down")}, rank=1, seed=2)
    shared = random_adapter({k: SHAPES[k] for k in ("l.0.up", "l.0.down")}, rank=4, seed=3)
    requests = [[rank2, rank1_few], [rank1_few], []]
    composed = compose([[Packed.of(a) for a in row] for row in requests],
                       shared=Packed.of(shared))
    for n, row in enumerate(requests):
        want = reference([shared, *row])
        for name in SHAPES:
            got = delta(composed, name, n)
            torch.testing.assert_close(got, want.get(name, torch.zeros_like(got)))


def test_compose_copies_into_the_requested_dtype_and_leaves_the_atoms_alone():
    atom = Packed.of(random_adapter(SHAPES, rank=2, seed=7), dtype=torch.bfloat16)
    before = atom.flat.clone()
    composed = compose([[atom, atom]], [[1.0, 3.0]], dtype=torch.float32)
    assert all(A.dtype == torch.float32 for A, _ in composed.values())
    assert torch.equal(atom.flat, before)
    assert compose([[], []]) == {}
    # the usual request (no weights, no padding) converts as it stacks: the same values
    other = Packed.of(random_adapter(SHAPES, rank=2, seed=8), dtype=torch.bfloat16)
    as_fp32 = compose([[atom, other]], dtype=torch.float32)
    as_bf16 = compose([[atom, other]], dtype=torch.bfloat16)
    for name, (A, B) in as_fp32.items():
        assert A.dtype == B.dtype == torch.float32
        assert torch.equal(A, as_bf16[name][0].float()) and torch.equal(B, as_bf16[name][1].float())


def test_concat_keeps_gradients_and_broadcasts_a_shared_part():
    own = {"m": (torch.randn(3, 2, 6, requires_grad=True), torch.randn(3, 10, 2,
                                                                      requires_grad=True))}
    shared = {"m": (torch.randn(1, 4, 6), torch.randn(1, 10, 4)), "n": (torch.randn(1, 1, 6),
                                                                        torch.randn(1, 10, 1))}
    joined = concat(own, shared)
    assert joined["m"][0].shape == (3, 6, 6) and joined["n"][0].shape == (3, 1, 6)
    joined["m"][1].sum().backward()
    assert own["m"][1].grad is not None


def test_bad_shapes_are_refused():
    packed = Packed.of(random_adapter(SHAPES, rank=2, seed=1))
    with pytest.raises(AdapterError, match="does not fit"):
        Packed(packed.flat[:-1], packed.layout)
    with pytest.raises(AdapterError, match="one value per atom"):
        compose([[packed]], [[1.0, 1.0]])
    with pytest.raises(AdapterError, match="at least one module"):
        Packed.of({})
    assert PackLayout.of(packed.unpack()) == packed.layout
