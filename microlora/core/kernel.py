"""The one multi-adapter LoRA kernel that the compiler and the composer share.

For a frozen linear W and a batch of samples, each sample b carries its own low-rank pair:

    y[b] = W x[b] + B[b] (A[b] x[b])        A[b]: (R, in), B[b]: (out, R)

(any LoRA scale is folded into B: ``microlora.core.pack``)

- compiling: sample b is atom b, and A[b], B[b] are its trainable rank-r parameters (plus,
  concatenated along the rank, the adapters composed beside it);
- composing: sample b is request b, and A[b], B[b] are the concatenation of its k atoms, which
  is exactly the sum of their deltas  sum_i B_i A_i (``pack.compose``);
- merging: W' = W + sum_i B_i A_i gives the same outputs with no per-token cost.

Samples whose ranks differ are zero-padded to the largest rank; a sample with no adapter is all
zeros and gets exactly the base output. The wrappers keep the stock model intact: ``remove()``
puts the original modules back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from microlora.core.config import TargetSpec
from microlora.core.errors import AdapterError
from microlora.core.pack import Adapter, BatchedAdapters
from microlora.core.targets import linear_features, select_targets


class MultiLoraLinear(nn.Module):
    """Wraps a frozen linear (``nn.Linear`` or GPT-2's ``Conv1D``) with per-sample adapters."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.transposed = type(base_layer).__name__ == "Conv1D"  # weight stored as (in, out)
        self.in_features, self.out_features = linear_features(base_layer)
        # an int8/int4 base (``core.quant``) has no float weight to merge into
        self.quantized = type(base_layer).__name__ == "QuantizedLinear"
        self.lora_A: Tensor | None = None  # (N, R, in); N = batch size, or 1 to broadcast
        self.lora_B: Tensor | None = None  # (N, out, R)
        # (N, T): 1 at the positions the adapters act on, 0 where the base layer acts alone;
        # None: everywhere. Set for one forward (``composer.prefix``), never for a decode step.
        self.token_mask: Tensor | None = None
        self._unmerged_weight: Tensor | None = None  # the original W while a merge is active

    @property
    def device(self) -> torch.device:
        """Where the base weight lives (a quantized one is a buffer, not a parameter)."""
        return (self.base_layer.qweight if self.quantized else self.base_layer.weight).device

    def set_adapter(self, A: Tensor, B: Tensor) -> None:
        """Per-sample adapters A (N, R, in), B (N, out, R), or one pair for every sample;
        moved once to the layer's device (a no-op, autograd kept, when they are there)."""
        A, B = A.to(self.device), B.to(self.device)
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
        self.lora_A, self.lora_B = A, B

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
            return y + h @ B[0].T
        if A.shape[0] not in (1, x.shape[0]):
            raise AdapterError(f"adapters were set for {A.shape[0]} samples but the batch "
                               f"has {x.shape[0]}")
        h = x @ A.transpose(1, 2)  # (N, T, in) @ (N, in, R) -> (N, T, R)
        if self.token_mask is not None:
            h = h * self.token_mask[..., None].to(h.dtype)
        return y + h @ B.transpose(1, 2)  # (N, T, R) @ (N, R, out) -> (N, T, out)

    # -- merging -----------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def merge(self, A: Tensor, B: Tensor) -> None:
        """W += B A for one adapter set (A: (R, in), B: (out, R)); undone exactly by
        ``unmerge``, which restores a saved copy of W rather than subtracting (subtraction
        leaves rounding error behind)."""
        if self.merged:
            raise AdapterError("this layer is already merged; unmerge before merging again")
        if self.quantized:
            raise AdapterError(f"cannot merge adapters into a {self.base_layer.bits}-bit base "
                               "weight: use stacked composition (--composition stacked), or "
                               "load the base in fp32 or bf16 (--base-dtype)")
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
                w.data.addmm_(A.T, B.T)
            else:
                w.data.addmm_(B, A)
        else:  # add in fp32, round once
            delta = B @ A
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

    def set_adapters(self, adapters: BatchedAdapters) -> None:
        """Activate per-sample adapters; targets missing from ``adapters`` get none."""
        unknown = set(adapters) - set(self.layers)
        if unknown:
            raise AdapterError(f"adapters for modules that are not targets: {sorted(unknown)[:3]}")
        for name, layer in self.layers.items():
            if name in adapters:
                layer.set_adapter(*adapters[name])
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
    def adapters(self, adapters: BatchedAdapters) -> Iterator[None]:
        """Adapters active for the ``with`` body only, cleared even if it raises."""
        self.set_adapters(adapters)
        try:
            yield
        finally:
            self.clear()

    def merge(self, adapters: Adapter | BatchedAdapters) -> None:
        """Fold one adapter set into the base weights: module -> (A (R, in), B (out, R)), or
        what ``pack.compose`` gives for a single request (A (1, R, in), B (1, out, R))."""
        if any(layer.merged for layer in self.layers.values()):
            raise AdapterError("the model is already merged; unmerge before merging again")
        unknown = set(adapters) - set(self.layers)
        if unknown:
            raise AdapterError(f"cannot merge into {sorted(unknown)[:3]}: not target modules")
        try:
            for name, (A, B) in adapters.items():
                if A.dim() == 3:
                    if A.shape[0] != 1:
                        raise AdapterError(f"merging takes one request's adapters, not "
                                           f"{A.shape[0]}")
                    A, B = A[0], B[0]
                self.layers[name].merge(A, B)
        except BaseException:
            self.unmerge()  # all or nothing: nothing was merged before this call
            raise

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    @contextmanager
    def merged(self, adapters: Adapter | BatchedAdapters) -> Iterator[None]:
        """Base weights merged for the ``with`` body only, restored exactly even if it raises."""
        self.merge(adapters)
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


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
