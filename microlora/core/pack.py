"""The one form of an adapter between the compiler, the store and the composer.

An adapter is, per target module, A (r, in) and B (out, r) with any scale folded into B, so its
delta is exactly B @ A (PEFT's layout with ``lora_alpha = r``). ``Packed`` holds a whole adapter
as one flat vector in a ``PackLayout``: what the trainer returns, what the store keeps (read
back as a zero-copy view of LMDB's memory map, or dequantized from int8 into float32), and what
``compose`` turns into the kernel's per-request tensors.

Composing atoms concatenates them along the rank, which is exactly the sum of their deltas:
[B_1 B_2] [A_1; A_2] = B_1 A_1 + B_2 A_2.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from microlora.core.errors import AdapterError

# One adapter: module name -> (A: (r, in), B: (out, r)).
Adapter = Mapping[str, tuple[Tensor, Tensor]]
# Per-sample adapters for a whole batch: module name -> (A: (N, R, in), B: (N, out, R)).
BatchedAdapters = Mapping[str, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class PackLayout:
    """How one adapter is laid out as a single flat vector, for storage and fast composing.

    Modules of one shape form a group (the gate and up projections of every adapted layer,
    say); a group is stored as the A's of its modules, each (r, in), then their B's transposed,
    each (r, out). Unpacking is views only, and k atoms compose with one stack per group
    rather than a copy per module.
    modules: (name, rank, in_features, out_features) per target module, in pack order.
    """

    modules: tuple[tuple[str, int, int, int], ...]

    def __hash__(self) -> int:  # a fetch looks its layout up a few times per atom
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash(self.modules)

    @classmethod
    def of(cls, adapter: Adapter) -> PackLayout:
        dims = [(A.shape[0], A.shape[1], B.shape[0], name) for name, (A, B) in adapter.items()]
        return cls(tuple((name, r, d_in, d_out) for r, d_in, d_out, name in sorted(dims)))

    @functools.cached_property
    def groups(self) -> tuple[tuple[tuple[str, ...], int, int, int, int, int], ...]:
        """(names, r, in, out, offset of the group's A's, offset of its B's) per shape group."""
        out, o = [], 0
        for (r, d_in, d_out), members in itertools.groupby(self.modules, key=lambda m: m[1:]):
            names = tuple(m[0] for m in members)
            out.append((names, r, d_in, d_out, o, o + len(names) * r * d_in))
            o += len(names) * r * (d_in + d_out)
        return tuple(out)

    @functools.cached_property
    def ranks(self) -> dict[str, int]:
        return {name: r for name, r, _, _ in self.modules}

    @functools.cached_property
    def size(self) -> int:  # read by every Packed made, k times a fetch: computed once
        return sum(r * (d_in + d_out) for _, r, d_in, d_out in self.modules)

    def pack(self, adapter: Adapter, dtype: torch.dtype = torch.float32) -> Tensor:
        parts = []
        for names, *_ in self.groups:
            parts += [adapter[name][0].detach().reshape(-1) for name in names]
            parts += [adapter[name][1].detach().T.reshape(-1) for name in names]
        return torch.cat(parts).to("cpu", dtype)

    def unpack(self, flat: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Views into ``flat`` (size,): module -> (A (r, in), B (out, r))."""
        out = {}
        for names, r, d_in, d_out, oa, ob in self.groups:
            A = flat[oa:oa + len(names) * r * d_in].view(len(names), r, d_in)
            Bt = flat[ob:ob + len(names) * r * d_out].view(len(names), r, d_out)
            out.update({name: (A[j], Bt[j].T) for j, name in enumerate(names)})
        return out


@dataclass(frozen=True, eq=False)
class Packed:
    """One adapter (scale folded into B) as a flat vector in ``layout``'s order."""

    flat: Tensor  # (layout.size,)
    layout: PackLayout

    def __post_init__(self) -> None:
        if self.flat.dim() != 1 or self.flat.numel() != self.layout.size:
            raise AdapterError(f"a packed adapter of {self.flat.numel()} values does not fit "
                               f"its layout of {self.layout.size}")

    @classmethod
    def of(cls, adapter: Adapter, dtype: torch.dtype = torch.float32) -> Packed:
        """Pack module -> (A (r, in), B (out, r)), whose delta is B @ A."""
        if not adapter:
            raise AdapterError("an adapter needs at least one module")
        layout = PackLayout.of(adapter)
        return cls(layout.pack(adapter, dtype), layout)

    def unpack(self) -> dict[str, tuple[Tensor, Tensor]]:
        """module -> (A (r, in), B (out, r)): views into ``flat``."""
        return self.layout.unpack(self.flat)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(name for name, *_ in self.layout.modules)

    @property
    def rank(self) -> int:
        return max(r for _, r, _, _ in self.layout.modules)

    def to(self, dtype: torch.dtype) -> Packed:
        """A copy in ``dtype`` (e.g. out of a store's memory map, which is only valid while
        its read transaction is open)."""
        return Packed(self.flat.to(dtype, copy=True), self.layout)


def compose(rows: Sequence[Sequence[Packed]],
            weights: Sequence[Sequence[float]] | Tensor | None = None,
            shared: Packed | None = None, *, dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None,
            shared_in: Sequence[bool] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """The kernel's per-request adapters: request n is the sum of the deltas of its atoms
    ``rows[n]`` (atom i's weighted by ``weights[n][i]``) and of ``shared`` (e.g. the reader,
    first in every request, or in those where ``shared_in[n]`` is true).

    Requests with fewer atoms, and atoms that do not adapt a module, are zero-padded: a zero
    rank adds nothing, and a request with no atoms gets exactly the base model. Returns module
    -> (A (N, R, in), B (N, out, R)); B is a transposed view, the layout the kernel multiplies
    by. The atoms of a layout are taken as the rows of one matrix (the block a fetch
    dequantized them into, else one stack of them) and copied into buffers of ``dtype`` on
    ``device`` with one copy per shape group and side: a fetch pays a few microseconds per
    torch call, more than for the values, so the atoms are never sliced one by one.
    """
    n = len(rows)
    if weights is not None and [len(w) for w in weights] != [len(r) for r in rows]:
        raise AdapterError("weights must hold one value per atom of each request")
    if weights is not None and all(float(w) == 1.0 for row in weights for w in row):
        weights = None
    by_layout: dict[PackLayout, list[list[int]]] = {}  # layout -> per request, atom indices
    for i, atoms in enumerate(rows):
        for j, packed in enumerate(atoms):
            by_layout.setdefault(packed.layout, [[] for _ in range(n)])[i].append(j)
    parts = ([(shared.layout, 1)] if shared is not None else []) + \
        [(layout, max(map(len, slots))) for layout, slots in by_layout.items()]
    if shared is None and len(by_layout) == 1 and weights is None:
        (layout, slots), = by_layout.items()
        if all(len(slot) == len(slots[0]) for slot in slots):  # the usual request: no padding
            return _stacked(layout, [rows[i][j].flat for i, slot in enumerate(slots)
                                     for j in slot], n, dtype, device)
    buffers = _Buffers(parts, n, dtype, device)
    if shared is not None:
        keep = None if shared_in is None else \
            torch.tensor(shared_in, dtype=dtype, device=device).view(-1, 1, 1)
        for name, (A, B) in shared.unpack().items():
            a, bt = buffers.slot(name, 0, A.shape[0])
            a.copy_(A.expand_as(a))
            bt.copy_(B.T.expand_as(bt))
            if keep is not None:  # a zero B: the requests without it get nothing
                bt.mul_(keep)
    for p, (layout, slots) in enumerate(by_layout.items(), start=int(shared is not None)):
        k = parts[p][1]
        some = next(rows[i][s[0]].flat for i, s in enumerate(slots) if s)
        zero = torch.zeros_like(some)  # fills the slots of requests with fewer atoms
        flats = [flat for i, slot in enumerate(slots)
                 for flat in [rows[i][j].flat for j in slot] + [zero] * (k - len(slot))]
        w = None
        if weights is not None:
            w = torch.zeros(n, k)
            for i, slot in enumerate(slots):
                w[i, :len(slot)] = torch.tensor([float(weights[i][j]) for j in slot])
        matrix = _matrix(flats)
        for group in layout.groups:
            A, Bt = _stack_group(group, matrix, n)
            buffers.write(group[0], p, A, Bt,
                          None if w is None else w.repeat_interleave(group[1], dim=1))
    return buffers.adapters()


def _stacked(layout: PackLayout, flats: list[Tensor], n: int, dtype: torch.dtype,
             device: torch.device | str | None) -> dict[str, tuple[Tensor, Tensor]]:
    """``compose`` when every request has k atoms of one layout and nothing else: one copy
    per shape group and side, converting to ``dtype`` as it copies where the result stays on
    the CPU (a store's float32 or bf16 atoms for a model of the other dtype: one pass, not
    two), else one conversion to ``dtype`` on ``device``."""
    out = {}
    on_cpu = device is None or torch.device(device).type == "cpu"
    matrix = _matrix(flats)
    for group in layout.groups:
        A, Bt = _stack_group(group, matrix, n, dtype if on_cpu else None)
        if not on_cpu:
            A, Bt = A.to(device=device, dtype=dtype), Bt.to(device=device, dtype=dtype)
        out.update(zip(group[0], zip(A.unbind(0), Bt.transpose(2, 3).unbind(0))))
    return out


def _matrix(flats: list[Tensor]) -> Tensor:
    """The flat vectors as the rows of one (len, size) matrix: the block they are already
    rows of (an int8 fetch dequantizes its atoms into one), else one stack. A fetch pays a
    few microseconds per torch call, so a group's atoms are sliced as one matrix, not one by
    one."""
    base, size = flats[0]._base, flats[0].numel()
    if base is not None and base.dim() == 2 and base.shape == (len(flats), size) \
            and base.is_contiguous():
        step, start = size * base.element_size(), base.data_ptr()
        if all(f.data_ptr() == start + i * step for i, f in enumerate(flats)):
            return base
    return torch.stack(flats)


def _stack_group(group: tuple, matrix: Tensor, n: int, dtype: torch.dtype | None = None
                 ) -> tuple[Tensor, Tensor]:
    """One shape group of N requests' k atoms each (``matrix``'s rows, request by request):
    A's (m, N, k*r, in) and B's transposed (m, N, k*r, out), copied once (into ``dtype``, if
    given)."""
    names, r, d_in, d_out, oa, ob = group
    m, atoms = len(names), matrix.shape[0]
    # each atom's (m, r, in) block, atoms along dim 1: (m, N*k, r, in) is already
    # (m, N, k*r, in) in memory, each module's atoms one after another
    sides = []
    for offset, d in ((oa, d_in), (ob, d_out)):
        block = matrix[:, offset:offset + m * r * d].view(atoms, m, r, d).transpose(0, 1)
        out = torch.empty(m, atoms, r, d, dtype=dtype or matrix.dtype, device=matrix.device)
        sides.append(out.copy_(block).view(m, n, atoms // n * r, d))
    return sides[0], sides[1]


class _Buffers:
    """The zero-filled output of ``compose``: per module, its rank split into one slot per
    part (the shared adapter, then each layout's k atoms), modules of one shape and total rank
    sharing one (m, N, R, d) block so that a layout's group is written with one copy."""

    def __init__(self, parts: Sequence[tuple[PackLayout, int]], n: int, dtype: torch.dtype,
                 device: torch.device | str | None):
        self.offsets: dict[str, list[int]] = {}  # module -> start of each part's slot
        dims: dict[str, tuple[int, int]] = {}
        for layout, _ in parts:
            for name, _, d_in, d_out in layout.modules:
                dims.setdefault(name, (d_in, d_out))
        for name in dims:
            o, starts = 0, []
            for layout, k in parts:
                starts.append(o)
                o += k * layout.ranks.get(name, 0)
            self.offsets[name] = starts + [o]
        self.blocks: dict[str, tuple[Tensor, Tensor, int]] = {}  # module -> (A, Bt, index)
        shape_of = {name: (*dims[name], self.offsets[name][-1]) for name in dims}
        for (d_in, d_out, rank), members in itertools.groupby(
                sorted(dims, key=lambda nm: (shape_of[nm], nm)), key=shape_of.get):
            names = list(members)
            A = torch.zeros(len(names), n, rank, d_in, dtype=dtype, device=device)
            Bt = torch.zeros(len(names), n, rank, d_out, dtype=dtype, device=device)
            self.blocks.update({name: (A, Bt, j) for j, name in enumerate(names)})

    def slot(self, name: str, part: int, width: int) -> tuple[Tensor, Tensor]:
        """Views of one module's slot for one part: A (N, width, in), Bt (N, width, out)."""
        A, Bt, j = self.blocks[name]
        start = self.offsets[name][part]
        return A[j, :, start:start + width], Bt[j, :, start:start + width]

    def write(self, names: Sequence[str], part: int, A: Tensor, Bt: Tensor,
              weights: Tensor | None) -> None:
        """Copy a layout group's stacked atoms (m, N, k*r, d) into their slots."""
        width = A.shape[2]
        block, _, first = self.blocks[names[0]]
        start = self.offsets[names[0]][part]
        together = len(names) == len(block) and all(
            self.blocks[nm][2] == first + j and self.offsets[nm][part] == start
            for j, nm in enumerate(names))
        if together:  # the usual case: one copy per side for the whole group
            a_out, b_out, _ = self.blocks[names[0]]
            targets = [(a_out[:, :, start:start + width], b_out[:, :, start:start + width],
                        A, Bt)]
        else:
            targets = [(*self.slot(nm, part, width), A[j], Bt[j]) for j, nm in enumerate(names)]
        for a, bt, src_a, src_bt in targets:
            a.copy_(src_a)
            bt.copy_(src_bt)
            if weights is not None:
                bt.mul_(weights.to(bt.device, bt.dtype)[..., None])

    def adapters(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: (A[j], Bt[j].transpose(1, 2)) for name, (A, Bt, j) in self.blocks.items()}


def concat(*parts: BatchedAdapters) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-request adapters joined along the rank (their deltas summed), keeping autograd:
    how the trainer puts an atom's own trainable adapter beside frozen company. Every part has
    the same N (or 1, broadcast); a module that only some parts adapt keeps those."""
    n = max((A.shape[0] for part in parts for A, _ in part.values()), default=1)
    out: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
    for part in parts:
        for name, (A, B) in part.items():
            a_list, b_list = out.setdefault(name, ([], []))
            a_list.append(A.expand(n, *A.shape[1:]))
            b_list.append(B.expand(n, *B.shape[1:]))
    return {name: (torch.cat(a, 1), torch.cat(b, 2)) for name, (a, b) in out.items()}
