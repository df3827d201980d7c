"""One atom on disk: its adapter, embedding, text and provenance in a single LMDB value.

A value is a 24-byte prefix (magic, format version, BLAKE2b-128 checksum of the rest) followed
by a standard safetensors payload: PEFT's tensor names (``base_model.model.<module>.lora_A.
weight``), the embedding as ``microlora.embedding``, and everything else as JSON in the
safetensors metadata. Decoding reads tensors straight out of the buffer (LMDB's memory map)
without copying; verification recomputes the checksum.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from microlora.errors import StoreError

MAGIC = b"MLA\x00"
RECORD_VERSION = 1
_PREFIX = struct.Struct("<4sI16s")  # magic, record version, checksum: 24 bytes keeps 8-alignment
EMBEDDING_KEY = "microlora.embedding"
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"
_PEFT_PREFIX = "base_model.model."
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass
class AtomRecord:
    """A knowledge atom as the store keeps it.

    adapter: module name -> (A: (r, in), B: (out, r)), PEFT's layout and scaling convention.
    embedding: the atom text's unit-norm vector (what the FAISS index is rebuilt from).
    source, start, end: where the text came from (character offsets into the source).
    config: the compile config that produced the adapter (rank, scale, targets, ...).
    """

    id: str
    text: str
    adapter: dict[str, tuple[Tensor, Tensor]]
    embedding: np.ndarray
    base_fingerprint: str
    source: str = ""
    start: int = 0
    end: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.adapter.values())


def checksum(payload: bytes | memoryview) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


def encode(record: AtomRecord, dtype: torch.dtype = torch.bfloat16) -> bytes:
    """Serialise a record; adapter tensors are stored in ``dtype`` (bf16 or fp16)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise StoreError(f"adapters are stored as bf16 or fp16, not {dtype}")
    tensors: dict[str, Tensor] = {}
    for name, (A, B) in record.adapter.items():
        tensors[_PEFT_PREFIX + name + _LORA_A] = A.detach().to("cpu", dtype).contiguous()
        tensors[_PEFT_PREFIX + name + _LORA_B] = B.detach().to("cpu", dtype).contiguous()
    tensors[EMBEDDING_KEY] = torch.as_tensor(np.asarray(record.embedding, np.float32)).reshape(-1)
    meta = {"id": record.id, "text": record.text, "source": record.source,
            "start": record.start, "end": record.end, "config": record.config,
            "base_fingerprint": record.base_fingerprint, "extra": record.extra}
    payload = save_safetensors(tensors, metadata={"microlora": json.dumps(meta)})
    return _PREFIX.pack(MAGIC, RECORD_VERSION, checksum(payload)) + payload


def verify(value: bytes | memoryview) -> str | None:
    """None if the value is intact, else what is wrong with it."""
    if len(value) < _PREFIX.size:
        return "truncated record"
    magic, version, digest = _PREFIX.unpack_from(value)
    if magic != MAGIC:
        return "not a microlora atom record (bad magic)"
    if version != RECORD_VERSION:
        return f"record version {version}, this microlora reads {RECORD_VERSION}"
    if checksum(memoryview(value)[_PREFIX.size:]) != digest:
        return "checksum mismatch (the record's bytes changed after it was written)"
    return None


def decode(value: bytes | memoryview, *, copy: bool = True, check: bool = False) -> AtomRecord:
    """Parse a record. With ``copy=False`` the tensors are views into ``value`` (no copy), valid
    only as long as the buffer is (for LMDB: the read transaction)."""
    if check and (problem := verify(value)):
        raise StoreError(problem)
    buf = memoryview(value)[_PREFIX.size:]
    (n,) = struct.unpack_from("<Q", buf)
    try:
        header = json.loads(bytes(buf[8:8 + n]))
        meta = json.loads(header.pop("__metadata__")["microlora"])
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise StoreError(f"unreadable record header: {e}") from e
    data = buf[8 + n:]
    tensors = {key: _tensor(data, spec, copy) for key, spec in header.items()}
    adapter = {}
    for key, A in tensors.items():
        if key.endswith(_LORA_A):
            name = key[len(_PEFT_PREFIX):-len(_LORA_A)]
            adapter[name] = (A, tensors[_PEFT_PREFIX + name + _LORA_B])
    return AtomRecord(
        id=meta["id"], text=meta["text"], adapter=adapter,
        embedding=tensors[EMBEDDING_KEY].numpy(), base_fingerprint=meta["base_fingerprint"],
        source=meta["source"], start=meta["start"], end=meta["end"], config=meta["config"],
        extra=meta.get("extra", {}),
    )


def _tensor(data: memoryview, spec: dict, copy: bool) -> Tensor:
    start, end = spec["data_offsets"]
    dtype = _DTYPES.get(spec["dtype"])
    if dtype is None:
        raise StoreError(f"unsupported tensor dtype {spec['dtype']} in record")
    if start == end:
        return torch.empty(spec["shape"], dtype=dtype)
    with warnings.catch_warnings():  # LMDB's map is read-only; the views are never written
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(data[start:end], dtype=dtype).view(spec["shape"])
    return t.clone() if copy else t
