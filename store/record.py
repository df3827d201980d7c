"""One atom on disk: its adapter, embedding, text and provenance in a single LMDB value.

A value is a 24-byte prefix (magic, record version, BLAKE2b-128 checksum of the rest) followed
by a standard safetensors payload: ``microlora.adapter``, the whole adapter as one flat vector
in ``PackLayout`` order (``microlora.core.pack.Packed``), and ``microlora.embedding`` (float32);
the layout, text, provenance and config are JSON in the safetensors metadata. Two versions:

    1  the adapter in bf16 or fp16 (``--adapter-dtype bf16|fp16``; every store before int8)
    2  the adapter in int8 with one bf16 scale per row, ``microlora.scales`` (``store/quantize``)

Decoding reads tensors straight out of the buffer (LMDB's memory map): a version 1 adapter is
a zero-copy view; a version 2 adapter is dequantized into a float32 ``Packed`` (so everything
after the store sees one form of an adapter), the int8 atoms of one fetch together as the rows
of one block (``parse``, then ``build``). Verification recomputes the checksum. Metadata is
parsed with orjson: with json, its two parses per record were a sixth of a k=8 fetch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from microlora.core.config import ADAPTER_DTYPES
from microlora.core.errors import StoreError
from microlora.core.pack import Packed, PackLayout
from store import quantize

MAGIC = b"MLA\x00"
RECORD_VERSION = 2  # what an int8 record is written as; bf16 and fp16 ones stay version 1
READ_VERSIONS = (1, 2)
_PREFIX = struct.Struct("<4sI16s")  # magic, record version, checksum: 24 bytes keeps 8-alignment
EMBEDDING_KEY = "microlora.embedding"
ADAPTER_KEY = "microlora.adapter"
SCALES_KEY = "microlora.scales"
# How a record's tensors are read: as numpy views of the value (a numpy view costs a fifth of a
# torch one, and a fetch makes 24), bf16 as its raw 16 bits, which numpy has no type for;
# ``_torch`` gives the torch view of an array stored as ``dtype``.
_ARRAYS = {"BF16": np.dtype("<i2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
           "I8": np.dtype("i1")}
_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8}
_FLOATS = {"bf16": torch.bfloat16, "fp16": torch.float16}
_REQUIRED = ("id", "text", "base_fingerprint", "source", "start", "end", "config")


@dataclass
class AtomRecord:
    """A knowledge atom as the store keeps it.

    adapter: the packed adapter, the compile scale folded into B (delta = B @ A);
        ``adapter.unpack()`` gives module name -> (A: (r, in), B: (out, r)), PEFT's layout.
    embedding: the atom text's unit-norm vector (what the FAISS index is rebuilt from).
    source, start, end: where the text came from (character offsets into the source).
    context, context_at: the atoms of its paragraph around it, itself at ``context_at``:
        what its window (``composer``) is cut from; empty for atoms stored before windows.
    page, section: its page (PDF) or slide (PPTX) and heading path in its source; 0 and []
        where the format has none, and for atoms stored before formatted documents.
    config: the compile config that produced the adapter (rank, scale, targets, ...).
    """

    id: str
    text: str
    adapter: Packed
    embedding: np.ndarray
    base_fingerprint: str
    source: str = ""
    start: int = 0
    end: int = 0
    context: list[str] = field(default_factory=list)
    context_at: int = 0
    page: int = 0
    section: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return self.adapter.flat.nbytes


def checksum(payload: bytes | memoryview) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


def storage(dtype: str | torch.dtype) -> str:
    """The name of an adapter storage (``ADAPTER_DTYPES``) given as a name or a torch dtype."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}.get(dtype, dtype)
    if name not in ADAPTER_DTYPES:
        raise StoreError(f"adapters are stored as {', '.join(ADAPTER_DTYPES)}, not {dtype}")
    return name


def version_for(dtype: str | torch.dtype) -> int:
    """The record version an adapter stored as ``dtype`` is written with."""
    return 2 if storage(dtype) == "int8" else 1


def adapter_bytes(values: int, rows: int, dtype: str | torch.dtype) -> int:
    """Bytes an adapter of ``values`` numbers in ``rows`` rows (rank components of A's and
    B's) takes stored as ``dtype``: int8 counts its bf16 scales."""
    return values + 2 * rows if storage(dtype) == "int8" else 2 * values


def finite_as_stored(adapter: Packed, dtype: str | torch.dtype) -> bool:
    """Whether the adapter stays finite once stored (a value finite in fp32 may overflow fp16;
    int8 scales are absmax / 127, finite wherever the values are)."""
    name = storage(dtype)
    flat = adapter.flat if name == "int8" else adapter.flat.to(_FLOATS[name])
    return bool(torch.isfinite(flat).all())


def encode(record: AtomRecord, dtype: str | torch.dtype = "int8") -> bytes:
    """Serialise a record, its adapter stored as ``dtype``: "int8" (version 2), "bf16" or
    "fp16" (version 1, byte for byte what every store before int8 holds)."""
    return encode_many([record], dtype)[0]


def encode_many(records: Sequence[AtomRecord], dtype: str | torch.dtype = "int8"
                ) -> list[bytes]:
    """``encode`` of each record; int8 adapters of one layout are quantized together (a
    store's batch of writes: a million 8 KB int8 atoms write 1.8x faster, RESULTS.md)."""
    name = storage(dtype)
    adapters: list[dict[str, torch.Tensor]] = [{} for _ in records]
    if name == "int8":
        by_layout: dict[PackLayout, list[int]] = {}
        for i, r in enumerate(records):
            by_layout.setdefault(r.adapter.layout, []).append(i)
        for layout, members in by_layout.items():
            q, scales = quantize.quantize_many(
                torch.stack([records[i].adapter.flat.detach().to("cpu") for i in members]),
                layout)
            for j, i in enumerate(members):
                adapters[i] = {ADAPTER_KEY: q[j], SCALES_KEY: scales[j]}
    else:
        for i, r in enumerate(records):
            adapters[i] = {ADAPTER_KEY: r.adapter.flat.to("cpu", _FLOATS[name])}
    return [_serialise(r, adapter, name) for r, adapter in zip(records, adapters)]


def _serialise(record: AtomRecord, adapter: dict[str, torch.Tensor], name: str) -> bytes:
    tensors = {EMBEDDING_KEY: torch.as_tensor(np.asarray(record.embedding, np.float32))
               .reshape(-1), **adapter}
    meta = {"id": record.id, "text": record.text, "source": record.source,
            "start": record.start, "end": record.end, "config": record.config,
            "context": list(record.context), "context_at": record.context_at,
            "base_fingerprint": record.base_fingerprint, "extra": record.extra}
    if record.page:  # only where there is one: records without keep their bytes
        meta["page"] = record.page
    if record.section:
        meta["section"] = list(record.section)
    layout = _layout_json(record.adapter.layout)
    payload = save_safetensors(tensors, metadata={"microlora": json.dumps(meta),
                                                  "microlora.layout": layout})
    return _PREFIX.pack(MAGIC, version_for(name), checksum(payload)) + payload


def stored_dtype(value: bytes | memoryview) -> str:
    """How a record's adapter is stored ("int8", "bf16" or "fp16"), from its header alone."""
    return storage(_TORCH[_parse(value)[1][ADAPTER_KEY][1]])


def verify(value: bytes | memoryview) -> str | None:
    """None if the value is intact, else what is wrong with it."""
    if len(value) < _PREFIX.size:
        return "truncated record"
    magic, version, digest = _PREFIX.unpack_from(value)
    if magic != MAGIC:
        return "not a microlora atom record (bad magic)"
    if version not in READ_VERSIONS:
        return f"record version {version}, this microlora reads versions {READ_VERSIONS}"
    if checksum(memoryview(value)[_PREFIX.size:]) != digest:
        return "checksum mismatch (the record's bytes changed after it was written)"
    return None


def decode(value: bytes | memoryview, *, copy: bool = True) -> AtomRecord:
    """Parse a record (``verify`` checks it). With ``copy=False`` the tensors are views into
    ``value`` (no copy), valid only as long as the buffer is (for LMDB: the read transaction);
    an int8 adapter is always a new float32 tensor."""
    return build([parse(value)], copy=copy)[0]


@dataclass(frozen=True)
class Parsed:
    """A record's fields read and checked, its arrays still numpy views into the value: what
    ``build`` turns into ``AtomRecord``s, several at once (a fetch of k atoms dequantizes
    their int8 adapters together, in a few torch calls instead of a few per atom)."""

    meta: dict[str, Any]
    embedding: np.ndarray  # float32 (dim,)
    layout: PackLayout
    adapter: np.ndarray  # (layout.size,): int8 with ``scales``, else the raw bits of ``dtype``
    dtype: torch.dtype  # what ``adapter`` holds: torch.int8, bfloat16 or float16
    scales: np.ndarray | None  # bf16 bits (rows,), an int8 adapter's

    @property
    def id(self) -> str:
        return self.meta["id"]


def parse(value: bytes | memoryview) -> Parsed:
    """The record's fields, checked to fit together (``StoreError`` if not); no copy."""
    header, arrays = _parse(value)
    try:
        meta = orjson.loads(header["microlora"])
        (embedding, _), (flat, dtype) = arrays[EMBEDDING_KEY], arrays[ADAPTER_KEY]
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"unreadable record metadata: {e}") from e
    missing = [key for key in _REQUIRED if key not in meta] if isinstance(meta, dict) \
        else ["every field (it is not an object)"]
    if missing:
        raise StoreError(f"record metadata lacks {', '.join(missing)}")
    try:
        layout = _layout(header["microlora.layout"])
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"unreadable adapter layout: {e}") from e
    if flat.shape != (layout.size,):
        raise StoreError(f"adapter has {flat.size} values, its layout needs {layout.size}")
    scales = None
    if dtype == "I8":
        scales, scales_dtype = arrays.get(SCALES_KEY, (None, None))
        if scales is None or scales_dtype != "BF16" or scales.shape != (quantize.rows(layout),):
            raise StoreError(f"an int8 adapter needs {quantize.rows(layout)} bf16 scales, it has "
                             f"{None if scales is None else (scales_dtype, scales.shape)}")
    return Parsed(meta, embedding, layout, flat, _TORCH[dtype], scales)


def build(parsed: Sequence[Parsed], *, copy: bool = True) -> list[AtomRecord]:
    """The records of ``parsed``, in order. int8 adapters of one layout are dequantized
    together into one float32 block (each record's adapter a row of it); bf16 and fp16 ones
    stay views of the value unless ``copy``."""
    adapters: dict[int, Packed] = {}
    int8: dict[PackLayout, list[int]] = {}
    for i, p in enumerate(parsed):
        if p.scales is None:
            flat = _torch(p.adapter, p.dtype)
            adapters[i] = Packed(flat.clone() if copy else flat, p.layout)
        else:
            int8.setdefault(p.layout, []).append(i)
    for layout, members in int8.items():
        # joined in numpy (new, writable arrays), then one torch view of each
        q = torch.from_numpy(np.concatenate([parsed[i].adapter for i in members]))
        scales = _torch(np.concatenate([parsed[i].scales for i in members]), torch.bfloat16)
        q, scales = q.view(len(members), -1), scales.view(len(members), -1)
        block = quantize.dequantize_many(q, scales, layout)
        adapters.update((i, Packed(row, layout)) for i, row in zip(members, block.unbind()))
    return [_record(p, adapters[i], copy) for i, p in enumerate(parsed)]


def _record(p: Parsed, adapter: Packed, copy: bool) -> AtomRecord:
    meta = p.meta
    return AtomRecord(
        id=meta["id"], text=meta["text"], adapter=adapter,
        embedding=p.embedding.copy() if copy else p.embedding,
        base_fingerprint=meta["base_fingerprint"],
        source=meta["source"], start=meta["start"], end=meta["end"], config=meta["config"],
        context=meta.get("context", []), context_at=meta.get("context_at", 0),
        page=meta.get("page", 0), section=meta.get("section", []),
        extra=meta.get("extra", {}),
    )


def _parse(value: bytes | memoryview
           ) -> tuple[dict[str, str], dict[str, tuple[np.ndarray, str]]]:
    """The safetensors metadata, and per tensor a zero-copy numpy view and its dtype's name
    (``_ARRAYS``)."""
    buf = memoryview(value)[_PREFIX.size:]
    try:
        (n,) = struct.unpack_from("<Q", buf)
        header = orjson.loads(buf[8:8 + n])
        metadata = header.pop("__metadata__")
        data = buf[8 + n:]
        return metadata, {key: _array(data, spec) for key, spec in header.items()}
    except (ValueError, KeyError, TypeError, AttributeError, struct.error,
            UnicodeDecodeError) as e:
        raise StoreError(f"unreadable record header: {e}") from e


def _layout_json(layout: PackLayout) -> str:
    return json.dumps([list(m) for m in layout.modules])


@functools.lru_cache(maxsize=64)
def _layout(text: str) -> PackLayout:
    """Layouts repeat across a store (one per compile config): parse each once."""
    return PackLayout(tuple((str(n), int(r), int(i), int(o)) for n, r, i, o in json.loads(text)))


def _array(data: memoryview, spec: dict) -> tuple[np.ndarray, str]:
    (start, end), name, shape = spec["data_offsets"], spec["dtype"], spec["shape"]
    dtype = _ARRAYS.get(name)
    if dtype is None:
        raise StoreError(f"unsupported tensor dtype {name} in record")
    count = math.prod(shape)
    if not 0 <= start <= end <= len(data) or end - start != count * dtype.itemsize:
        raise StoreError(f"tensor of shape {shape} does not fit bytes {start}..{end}")
    return np.frombuffer(data, dtype, count, start).reshape(shape), name


def _torch(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A torch view of ``array`` (raw 16 bits for bf16) as ``dtype``."""
    return torch.from_numpy(array).view(dtype)


# torch warns (once per process) that a view of a read-only array is not writable. LMDB's map
# is read-only by design and the views are never written, so spend that one warning here,
# silenced, instead of paying for a warnings filter on every decode.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.from_numpy(np.frombuffer(bytes(2), np.uint8))
