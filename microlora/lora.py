"""The one multi-adapter LoRA kernel that the compiler and the composer share.

For a frozen linear W and a batch of samples, each sample b carries its own low-rank pair:

    y[b] = W x[b] + s * B[b] (A[b] x[b])        A[b]: (R, in), B[b]: (out, R)

- compiling: sample b is atom b, and A[b], B[b] are its trainable rank-r parameters (plus,
  concatenated along the rank, the adapters composed beside it);
- composing: sample b is request b, and A[b], B[b] are the concatenation of its k atoms, which
  is exactly the sum of their deltas  sum_i s * B_i A_i;
- merging: W' = W + sum_i s * B_i A_i gives the same outputs with no per-token cost.

Samples whose ranks differ are zero-padded to the largest rank; a sample with no adapter is all
zeros and gets exactly the base output. The wrappers keep the stock model intact: ``remove()``
puts the original modules back.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from microlora.errors import AdapterError
from microlora.targets import TargetSpec, linear_features, select_targets

# One atom's adapter: module name -> (A: (r, in), B: (out, r)), PEFT's layout.
Adapter = Mapping[str, tuple[Tensor, Tensor]]
# Per-sample adapters for a whole batch: module name -> (A: (N, R, in), B: (N, out, R)).
BatchedAdapters = Mapping[str, tuple[Tensor, Tensor]]


class MultiLoraLinear(nn.Module):
    """Wraps a frozen linear (``nn.Linear`` or GPT-2's ``Conv1D``) with per-sample adapters."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.transposed = type(base_layer).__name__ == "Conv1D"  # weight stored as (in, out)
        self.in_features, self.out_features = linear_features(base_layer)
        self.lora_A: Tensor | None = None  # (N, R, in); N = batch size, or 1 to broadcast
        self.lora_B: Tensor | None = None  # (N, out, R)
        self.scale = 1.0
        self._unmerged_weight: Tensor | None = None  # the original W while a merge is active

    def set_adapter(self, A: Tensor, B: Tensor, scale: float = 1.0) -> None:
        if A.dim() == 2:  # one adapter for every sample
            A, B = A.unsqueeze(0), B.unsqueeze(0)
        if (A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0]
                or A.shape[2] != self.in_features or B.shape[1] != self.out_features
                or A.shape[1] != B.shape[2]):
            raise AdapterError(
                f"adapter shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit a linear "
                f"{self.in_features}->{self.out_features}; expected A (N, R, {self.in_features})"
                f" and B (N, {self.out_features}, R)"
            )
        self.lora_A, self.lora_B, self.scale = A, B, scale

    def clear_adapter(self) -> None:
        self.lora_A = self.lora_B = None

    def select_samples(self, indices: Tensor) -> None:
        """Keep the per-sample adapters of these samples only (the batch shrank)."""
        if self.lora_A is not None and self.lora_A.shape[0] > 1:
            idx = indices.to(self.lora_A.device)
            self.lora_A, self.lora_B = self.lora_A[idx], self.lora_B[idx]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.lora_A is None:
            return y
        A = self.lora_A.to(x.dtype)
        B = self.lora_B.to(x.dtype)
        if x.dim() == 2:  # (T, in): a single unbatched sequence
            h = x @ A[0].T  # (T, R)
            return y + self.scale * (h @ B[0].T)
        if A.shape[0] not in (1, x.shape[0]):
            raise AdapterError(f"adapters were set for {A.shape[0]} samples but the batch "
                               f"has {x.shape[0]}")
        h = x @ A.transpose(1, 2)  # (N, T, in) @ (N, in, R) -> (N, T, R)
        return y + self.scale * (h @ B.transpose(1, 2))  # (N, T, R) @ (N, R, out) -> (N, T, out)

    # -- merging -----------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def merge(self, A: Tensor, B: Tensor, scale: float = 1.0) -> None:
        """W += s * B A for one adapter set (A: (R, in), B: (out, R)); undone exactly by
        ``unmerge``, which restores a saved copy of W rather than subtracting (subtraction
        leaves rounding error behind)."""
        if self.merged:
            raise AdapterError("this layer is already merged; unmerge before merging again")
        if A.shape != (A.shape[0], self.in_features) or B.shape != (self.out_features,
                                                                     A.shape[0]):
            raise AdapterError(f"cannot merge A{tuple(A.shape)} B{tuple(B.shape)} into a "
                               f"linear {self.in_features}->{self.out_features}")
        w = self.base_layer.weight
        A, B = A.to(w.device, torch.float32), B.to(w.device, torch.float32)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):  # W is too big to scan
            raise AdapterError("merging would put NaN or inf into the base weight; refused")
        self._unmerged_weight = w.data.clone()
        if w.dtype == torch.float32:  # in place: one pass over W
            if self.transposed:  # Conv1D keeps W as (in, out)
                w.data.addmm_(A.T, B.T, alpha=scale)
            else:
                w.data.addmm_(B, A, alpha=scale)
        else:  # add in fp32, round once
            delta = scale * (B @ A)
            w.data.copy_(w.data.float() + (delta.T if self.transposed else delta))

    def unmerge(self) -> None:
        if self._unmerged_weight is None:
            return
        self.base_layer.weight.data.copy_(self._unmerged_weight)
        self._unmerged_weight = None


class MultiLoraModel:
    """Attaches ``MultiLoraLinear`` wrappers to a model's target linears and drives them as one.

    The model stays a stock transformers model; only the target modules are swapped for
    wrappers around the originals, and ``remove()`` swaps them back.
    """

    def __init__(self, model: nn.Module, targets: TargetSpec | Mapping[str, nn.Module]):
        self.model = model
        chosen = select_targets(model, targets) if isinstance(targets, TargetSpec) else targets
        self.layers: dict[str, MultiLoraLinear] = {}
        for name, module in chosen.items():
            wrapper = module if isinstance(module, MultiLoraLinear) else MultiLoraLinear(module)
            _set_submodule(model, name, wrapper)
            self.layers[name] = wrapper

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Module name -> (in_features, out_features) of every target."""
        return {n: (m.in_features, m.out_features) for n, m in self.layers.items()}

    def set_adapters(self, adapters: BatchedAdapters, scale: float = 1.0) -> None:
        """Activate per-sample adapters; targets missing from ``adapters`` get none."""
        unknown = set(adapters) - set(self.layers)
        if unknown:
            raise AdapterError(f"adapters for modules that are not targets: {sorted(unknown)[:3]}")
        for name, layer in self.layers.items():
            if name in adapters:
                layer.set_adapter(*adapters[name], scale=scale)
            else:
                layer.clear_adapter()

    def clear(self) -> None:
        for layer in self.layers.values():
            layer.clear_adapter()

    def select_samples(self, indices: Tensor) -> None:
        """Follow a batch that lost rows: keep only these samples' adapters, in this order."""
        for layer in self.layers.values():
            layer.select_samples(indices)

    @contextmanager
    def adapters(self, adapters: BatchedAdapters, scale: float = 1.0) -> Iterator[None]:
        """Adapters active for the ``with`` body only, cleared even if it raises."""
        self.set_adapters(adapters, scale)
        try:
            yield
        finally:
            self.clear()

    def merge(self, adapters: Adapter, scale: float = 1.0) -> None:
        """Fold one adapter set (module -> (A (R, in), B (out, R))) into the base weights."""
        if any(layer.merged for layer in self.layers.values()):
            raise AdapterError("the model is already merged; unmerge before merging again")
        unknown = set(adapters) - set(self.layers)
        if unknown:
            raise AdapterError(f"cannot merge into {sorted(unknown)[:3]}: not target modules")
        try:
            for name, (A, B) in adapters.items():
                self.layers[name].merge(A, B, scale)
        except BaseException:
            self.unmerge()  # all or nothing: nothing was merged before this call
            raise

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    @contextmanager
    def merged(self, adapters: Adapter, scale: float = 1.0) -> Iterator[None]:
        """Base weights merged for the ``with`` body only, restored exactly even if it raises."""
        self.merge(adapters, scale)
        try:
            yield
        finally:
            self.unmerge()

    def remove(self) -> nn.Module:
        """Undo everything and put the original linear modules back."""
        self.unmerge()
        for name, layer in self.layers.items():
            _set_submodule(self.model, name, layer.base_layer)
        self.layers = {}
        return self.model


def stack_adapters(
    requests: Sequence[Sequence[Adapter]],
    *,
    weights: Sequence[Sequence[float]] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, tuple[Tensor, Tensor]]:
    """Compose each request's atoms into one per-sample adapter for the kernel.

    Request b's atoms are concatenated along the rank (so the result is the sum of their
    deltas), each B scaled by the atom's weight; requests with less total rank are
    zero-padded, and a request with no atoms gets zeros, i.e. exactly the base model.
    Returns module -> (A: (N, R_max, in), B: (N, out, R_max)) for every module some atom adapts.
    """
    dims: dict[str, tuple[int, int]] = {}
    for atoms in requests:
        for atom in atoms:
            for name, (a, b) in atom.items():
                dims.setdefault(name, (a.shape[1], b.shape[0]))
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, (d_in, d_out) in dims.items():
        r_max = max(sum(a[name][0].shape[0] for a in atoms if name in a) for atoms in requests)
        A = torch.zeros(len(requests), r_max, d_in, dtype=dtype, device=device)
        B = torch.zeros(len(requests), d_out, r_max, dtype=dtype, device=device)
        for n, atoms in enumerate(requests):
            r0 = 0
            for i, atom in enumerate(atoms):
                if name not in atom:
                    continue
                a, b = atom[name]
                r = a.shape[0]
                A[n, r0:r0 + r].copy_(a)
                B[n, :, r0:r0 + r].copy_(b)
                if weights is not None and weights[n][i] != 1.0:
                    B[n, :, r0:r0 + r].mul_(float(weights[n][i]))
                r0 += r
        out[name] = (A, B)
    return out


def prepend_shared(batched: BatchedAdapters, shared: Adapter) -> dict[str, tuple[Tensor, Tensor]]:
    """Every sample's adapters with one shared adapter (e.g. the reader) concatenated in front
    along the rank: sample b's delta becomes shared + its own. Modules only one side adapts
    keep just that side."""
    n = next(iter(batched.values()))[0].shape[0] if batched else 1
    ref = next(iter(batched.values()))[0] if batched else next(iter(shared.values()))[0]
    out = dict(batched)
    for name, (A, B) in shared.items():
        A = A.to(ref.device, ref.dtype).expand(n, *A.shape)
        B = B.to(ref.device, ref.dtype).expand(n, *B.shape)
        if name in out:
            out[name] = (torch.cat([A, out[name][0]], 1), torch.cat([B, out[name][1]], 2))
        else:
            out[name] = (A, B)
    return out


def combine_adapters(atoms: Sequence[Adapter], weights: Sequence[float] | None = None,
                     **kwargs) -> dict[str, tuple[Tensor, Tensor]]:
    """One adapter (module -> (A (R, in), B (out, R))) whose delta is the weighted sum of the
    atoms' deltas: what ``MultiLoraModel.merge`` takes."""
    stacked = stack_adapters([atoms], weights=None if weights is None else [weights], **kwargs)
    return {name: (A[0], B[0]) for name, (A, B) in stacked.items()}


@dataclass(frozen=True)
class PackLayout:
    """How one atom's adapter is laid out as a single flat vector, for storage and fast fetch.

    Modules of one shape form a group (gate and up projections of every adapted layer, say);
    a group is stored as the A's of its modules, each (r, in), then their B's transposed, each
    (r, out). Unpacking one atom is views only, and k atoms fetched together compose with one
    stack per group rather than a copy per module (see ``compose_packed``).
    modules: (name, rank, in_features, out_features) per target module, in pack order.
    """

    modules: tuple[tuple[str, int, int, int], ...]

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

    @property
    def size(self) -> int:
        return sum(r * (d_in + d_out) for _, r, d_in, d_out in self.modules)

    def pack(self, adapter: Adapter, dtype: torch.dtype = torch.bfloat16) -> Tensor:
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


def compose_packed(requests: Sequence[Sequence[Tensor]], layout: PackLayout,
                   weights: Tensor | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-request adapters for the kernel from packed atoms (flat vectors of ``layout``, e.g.
    zero-copy views into the store): request n composes its k atoms, concatenated along the
    rank (the sum of their deltas), atom i weighted by ``weights[n, i]``. Every request has the
    same k (use ``stack_adapters`` for ragged requests). Returns module -> (A (N, k*r, in),
    B (N, out, k*r)); B is a transposed view, the layout the kernel multiplies by. The data is
    copied once, by one stack per shape group and side (and moved to ``device`` as one block
    per group)."""
    n, k = len(requests), len(requests[0])
    if any(len(atoms) != k for atoms in requests):
        raise AdapterError("compose_packed needs the same number of atoms in every request")
    flats = [flat for atoms in requests for flat in atoms]
    out = {}
    for names, r, d_in, d_out, oa, ob in layout.groups:
        m = len(names)
        # stacking every atom's (m, r, in) block along dim 1 puts each module's atoms one
        # after another: (m, N*k, r, in) is already (m, N, k*r, in) in memory
        A = torch.stack([f[oa:oa + m * r * d_in].view(m, r, d_in) for f in flats], dim=1)
        Bt = torch.stack([f[ob:ob + m * r * d_out].view(m, r, d_out) for f in flats], dim=1)
        A, Bt = A.view(m, n, k * r, d_in), Bt.view(m, n, k * r, d_out)
        A, Bt = A.to(device=device, dtype=dtype), Bt.to(device=device, dtype=dtype)
        if weights is not None:
            w = weights.to(device=Bt.device, dtype=Bt.dtype)
            Bt = Bt * w.repeat_interleave(r, dim=1)[None, :, :, None]
        out.update({name: (A[j], Bt[j].transpose(1, 2)) for j, name in enumerate(names)})
    return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
