"""int8 adapters with one scale per row: how a store keeps an adapter in half the bytes of bf16.

A row is one rank component of one module: a row of A (r, in) or a column of B (out, r), which
``PackLayout`` already lays out contiguously (a group's A's, then its B's transposed). Each
row gets its own absmax scale, so a module whose B is 100x smaller than its A, or one rank
component that learned more than the other, loses nothing to its neighbours' range. The
default adapter (rank 2, 18 MLP linears of Gemma 3 270M) has 96,768 values and 72 rows: 96,768
bytes of int8 plus 144 of bf16 scales, against 193,536 bytes of bf16.

Quantizing is round to nearest of ``x / s`` with ``s = absmax / 127`` rounded to bf16 (the
stored scale), clamped to [-127, 127]: every value comes back within ``s / 2`` of itself,
measured with the scale actually stored. Dequantizing gives ``s * q`` in float32, which is
exact (8 bits of scale times 7 of q), so quantizing a dequantized adapter gives back the
same bytes: a store merged or re-encoded from int8 atoms loses nothing more.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from microlora.core.pack import Packed, PackLayout

QMAX = 127  # symmetric: -128 is never used, so negating a row is exact


@functools.lru_cache(maxsize=64)
def row_blocks(layout: PackLayout) -> tuple[tuple[int, int, int], ...]:
    """(offset, rows, row length) of each run of equal-length rows in ``layout``'s flat vector:
    per shape group, its A's (m * r rows of ``in``) then its B's transposed (m * r of ``out``)."""
    out = []
    for names, r, d_in, d_out, oa, ob in layout.groups:
        out += [(oa, len(names) * r, d_in), (ob, len(names) * r, d_out)]
    return tuple(out)


def rows(layout: PackLayout) -> int:
    """How many scales an adapter of ``layout`` stores."""
    return sum(n for _, n, _ in row_blocks(layout))


def quantize(packed: Packed) -> tuple[Tensor, Tensor]:
    """``packed`` as (q: int8 (size,), scales: bf16 (rows,)), rows in flat order."""
    q, scales = quantize_many(packed.flat[None], packed.layout)
    return q[0], scales[0]


def quantize_many(flats: Tensor, layout: PackLayout) -> tuple[Tensor, Tensor]:
    """The k adapters of ``layout`` in the rows of ``flats`` (k, size) as (q: int8 (k, size),
    scales: bf16 (k, rows)): a batch written to a store is quantized in one pass over each run
    of rows, since per-call overhead, not arithmetic, is what one 8 KB adapter costs."""
    flat = flats.detach().to("cpu", torch.float32)
    k = flat.shape[0]
    q = torch.empty(k, layout.size, dtype=torch.int8)
    scales = []
    for offset, n, length in row_blocks(layout):
        x = flat[:, offset:offset + n * length].reshape(k, n, length)
        s = (x.abs().amax(dim=2) / QMAX).to(torch.bfloat16)  # (k, rows): the scale as stored
        s32 = s.float()[..., None]
        # an all-zero row has scale 0 and stays 0
        ratio = torch.where(s32 > 0, x / s32.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        q[:, offset:offset + n * length].view(k, n, length).copy_(
            ratio.round_().clamp_(-QMAX, QMAX))
        scales.append(s)
    return q, torch.cat(scales, dim=1)


@functools.lru_cache(maxsize=64)
def _chunks(layout: PackLayout) -> tuple[int, Tensor]:
    """(width, row of each chunk): the flat vector cut into chunks of ``width`` values (the
    gcd of the row lengths, 128 for Gemma 3's 640 and 2048), each inside one row, so that
    dequantizing is one multiply by a (chunks, 1) column of scales, not one per run of rows."""
    width = math.gcd(*(length for _, _, length in row_blocks(layout)))
    per_row = [length // width for _, n, length in row_blocks(layout) for _ in range(n)]
    return width, torch.repeat_interleave(torch.arange(len(per_row)), torch.tensor(per_row))


def dequantize(q: Tensor, scales: Tensor, layout: PackLayout) -> Packed:
    """The float32 adapter ``scales * q``; ``q`` and ``scales`` may be read-only views of a
    memory map."""
    return Packed(dequantize_many(q[None], scales[None], layout)[0], layout)


def dequantize_many(q: Tensor, scales: Tensor, layout: PackLayout) -> Tensor:
    """The float32 adapters ``scales[i] * q[i]`` of the rows of ``q`` (k, size) and ``scales``
    (k, rows) as the rows of one (k, size) block: one conversion and one multiply for all k,
    since a fetch pays per torch call (a few microseconds each) more than per value."""
    width, rows_of = _chunks(layout)
    flat = q.to(torch.float32)
    per_chunk = scales.float()[:, rows_of]  # (k, chunks)
    flat.view(len(q), -1, width).mul_(per_chunk.unsqueeze(2))
    return flat
