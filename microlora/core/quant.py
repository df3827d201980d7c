"""A frozen base linear with its weight stored in 8 or 4 bits (weight-only quantization).

The activations stay in floating point; only the weight is rounded, once, when the base model
is loaded (``load_base_model(dtype="int8")``). Adapters still train and compose in floating
point beside it (``microlora.core.kernel`` wraps a ``QuantizedLinear`` like any linear), and
gradients flow through it to the input, never to the (integer) weight.

- int8: symmetric, one scale per output row: W ~ q * s, q in [-127, 127];
- int4: asymmetric, one scale and offset per group of ``group_size`` inputs in a row:
  W ~ (q - 8) * s + z, q in [0, 15] (the layout of torch's tinygemm int4 kernels).

Why our own module rather than torchao: the matmuls are the CPU kernels that ship inside torch
itself (``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm_for_cpu``), the same ones
torchao's CPU paths call. torchao 0.18 (the release for torch 2.13) does run int8 weight-only
on the CPU, backward included, but through a float copy of the weight on every call (no int8
kernel), and its CPU int4 layout is a prototype; for this one module it would add a
dependency that logs failed CUDA-library loads at import. Off the CPU, int8 falls back to
dequantising on the fly (correct, not fast); int4 is CPU-only (``load_base_model`` refuses it
elsewhere).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from microlora.core.targets import linear_features

QUANTIZED_BITS = {"int8": 8, "int4": 4}
INT4_GROUP = 32  # inputs per int4 scale; tinygemm takes 32, 64, 128 or 256
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the CPU kernels take as activations
# Rows up to which the integer kernels beat dequantising W and a bf16 GEMM (2-core AMX CPU,
# Gemma 3 270M's shapes: even at 64-256 rows, about twice as slow past 1,000)
KERNEL_ROWS = 256


class QuantizedLinear(nn.Module):
    """A frozen linear y = x W^T + b with W kept as int8 or int4 (see the module docstring).

    Has ``in_features`` and ``out_features`` like ``nn.Linear``, but no float ``weight``:
    ``dequantize()`` rebuilds W (out, in) when something needs it (the backward pass, tests).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, qweight: Tensor,
                 scales: Tensor, bias: Tensor | None, group_size: int = INT4_GROUP):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        # int8: (out, in) int8; int4: tinygemm-packed uint8 (out, in / 2)
        self.register_buffer("qweight", qweight)
        # int8: (out,) per-row scales; int4: (in / group, out, 2) scale and offset per group
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def fits(cls, linear: nn.Module, bits: int, group_size: int = INT4_GROUP) -> bool:
        """Whether the kernel for ``bits`` takes this linear's shape (int4: out % 16 and
        in % group_size must be 0; int8 takes any)."""
        d_in, d_out = linear_features(linear)
        return bits == 8 or (d_out % 16 == 0 and d_in % group_size == 0)

    @classmethod
    @torch.no_grad()
    def of(cls, linear: nn.Module, bits: int, group_size: int = INT4_GROUP) -> QuantizedLinear:
        """Quantize an ``nn.Linear`` (or GPT-2's ``Conv1D``, weight stored (in, out))."""
        if bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        if not cls.fits(linear, bits, group_size):
            raise ValueError(f"a {linear_features(linear)} linear does not fit the int4 kernel")
        d_in, d_out = linear_features(linear)
        w = linear.weight.detach().float()
        w = w.T if type(linear).__name__ == "Conv1D" else w  # (out, in)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        if bits == 8:
            scales = w.abs().amax(1).clamp(min=1e-12) / 127  # (out,)
            q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
            return cls(d_in, d_out, 8, q.contiguous(), scales, bias, group_size)
        groups = w.reshape(d_out, d_in // group_size, group_size)  # (out, G, g)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        step = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low) / step).clamp(0, 15).to(torch.int32).reshape(d_out, d_in)
        packed = torch._convert_weight_to_int4pack_for_cpu(q.cpu().contiguous(), 2)
        zeros = low + 8 * step  # the kernel computes (q - 8) * s + z
        scale_zero = torch.cat([step, zeros], -1).transpose(0, 1).contiguous()  # (G, out, 2)
        return cls(d_in, d_out, 4, packed, scale_zero, bias, group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W (out, in) as the kernels see it."""
        if self.bits == 8:
            return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]
        order = _int4_order(self.out_features, self.in_features)
        if order is None:  # a packing we cannot read: through the kernel (an identity gives
            eye = torch.eye(self.in_features, dtype=_kernel_dtype(dtype))  # W^T), slowly
            return self._kernel(eye).T.to(dtype)
        nibbles = torch.stack([self.qweight & 15, self.qweight >> 4], -1).reshape(-1)
        q = nibbles.index_select(0, order)  # (out * in,) in row-major order
        groups = q.reshape(self.out_features, -1, self.group_size).float()  # (out, G, g)
        scale, zero = self.scales.float().permute(2, 1, 0)[..., None]  # (out, G, 1) each
        w = torch.addcmul(zero - 8 * scale, groups, scale)  # (q - 8) s + z, in one pass
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def _matmul(self, x: Tensor) -> Tensor:
        """x (M, in) @ W^T -> (M, out), without the bias. Few rows (decoding): the integer
        kernel, which reads a quarter or an eighth of the bytes; many (prefill, training):
        the weight dequantised once and a float GEMM (AMX on this CPU), about twice as fast
        there as the integer kernels, which are built for few rows."""
        if x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and len(x) <= KERNEL_ROWS:
            return self._kernel(x)
        if x.device.type != "cpu" and self.bits == 4:
            raise RuntimeError("int4 weights run on the CPU only")
        return F.linear(x, self.dequantize(x.dtype))

    def _kernel(self, x: Tensor) -> Tensor:
        scales = self.scales.to(x.dtype)
        if self.bits == 8:
            return torch._weight_int8pack_mm(x.contiguous(), self.qweight, scales)
        return torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.qweight, self.group_size,
                                                 scales)

    def forward(self, x: Tensor) -> Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # as nn.Linear would under autocast
            x = x.to(torch.get_autocast_dtype(dev))
        if dev == "cpu" and x.dtype not in _KERNEL_DTYPES:  # e.g. fp16: no CPU kernel
            x = x.float()
        lead = x.shape[:-1]
        y = _QuantizedMatmul.apply(x.reshape(-1, self.in_features), self)  # (M, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}{group}, bias={self.bias is not None}")


class _QuantizedMatmul(torch.autograd.Function):
    """x @ W^T with a frozen quantized W: the gradient reaches x (so adapters below and
    beside this layer train), never W."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantizedLinear) -> Tensor:
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        w = ctx.layer.dequantize(grad.dtype)  # (out, in), freed after this step
        return grad @ w, None


def quantize_linears(modules: dict[str, nn.Module], root: nn.Module, bits: int,
                     group_size: int = INT4_GROUP) -> list[str]:
    """Swap each named linear of ``root`` for its ``QuantizedLinear`` (freeing the float
    weight as it goes, so peak memory stays near one model); returns the names of those left
    in floating point because the int4 kernel does not take their shape."""
    skipped = []
    for name, module in modules.items():
        if not QuantizedLinear.fits(module, bits, group_size):
            skipped.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, QuantizedLinear.of(module, bits, group_size))
    return skipped


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the quantized layers' buffers (their weights, scales and biases)."""
    return sum(b.numel() * b.element_size() for m in model.modules()
               if isinstance(m, QuantizedLinear) for b in m.buffers())


@functools.lru_cache(maxsize=16)
def _int4_order(n: int, k: int) -> Tensor | None:
    """Where torch's CPU int4 packing puts each value of an (n, k) matrix: for each value in
    row-major order, the position of its nibble among the packed (n, k / 2) bytes' nibbles
    (low then high, in byte order). The layout depends on the CPU's vector width, so it is
    learnt from the packer itself: pack the base-16 digits of every index, one digit per
    pass. None if the packing is not a plain rearrangement of nibbles (then ``dequantize``
    asks the kernel)."""
    idx = torch.arange(n * k, dtype=torch.int64)
    order = torch.zeros(n * k, dtype=torch.int64)
    shift = 0
    while shift == 0 or (n * k - 1) >> shift:
        digit = ((idx >> shift) & 15).to(torch.int32).reshape(n, k)
        packed = torch._convert_weight_to_int4pack_for_cpu(digit, 2)
        order |= torch.stack([packed & 15, packed >> 4], -1).reshape(-1).long() << shift
        shift += 4
    # order: for each nibble, the value it holds; invert it, checking it is a permutation
    position = torch.full((n * k,), -1, dtype=torch.int64)
    position[order] = idx
    if (position < 0).any():
        return None
    probe = torch.randint(0, 16, (n, k), dtype=torch.int32)
    nibbles = torch._convert_weight_to_int4pack_for_cpu(probe, 2)
    nibbles = torch.stack([nibbles & 15, nibbles >> 4], -1).reshape(-1)
    if not torch.equal(nibbles.index_select(0, position).long(), probe.reshape(-1).long()):
        return None
    return position


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _KERNEL_DTYPES else torch.float32
