"""A store's header: what it is for (the base model and embedder its atoms belong to) and its
format version, kept under ``__meta__``/``header``.

Format versions: 1 holds version 1 records only (bf16 or fp16 adapters); 2 may also hold
version 2 records (int8 adapters, ``store/record.py``). This microlora reads both. A new store
is made at 2; a version 1 store stays at 1 until an int8 atom is written into it, and is then
marked 2 in the same transaction, so a microlora that reads only version 1 refuses the whole
store ("upgrade microlora") instead of calling its int8 atoms corrupt one by one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from microlora.core.errors import StoreError

FORMAT_VERSION = 2
READ_FORMATS = (1, 2)
HEADER_KEY = b"header"


@dataclass(frozen=True)
class StoreHeader:
    """What a store is for: the base model and embedder every adapter in it belongs to."""

    base_fingerprint: str
    base_name: str
    embedder_fingerprint: str
    embedder_name: str
    embedding_dim: int
    format_version: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def holding(self, record_version: int) -> StoreHeader:
        """This header, its format raised to hold records of ``record_version``."""
        return replace(self, format_version=max(self.format_version, record_version))


def parse_header(raw: bytes, path: Path) -> StoreHeader:
    """The header stored at ``path``, or a ``StoreError`` that says what to do."""
    try:
        header = json.loads(raw)
        version = header.get("format_version")
    except (ValueError, AttributeError):
        raise StoreError(f"{path} has a corrupt header; restore the store from a backup or "
                         "re-compile it") from None
    if version not in READ_FORMATS:
        hint = ("upgrade microlora" if isinstance(version, int) and version > FORMAT_VERSION
                else "re-compile your documents into a new store")
        raise StoreError(f"{path} is a format v{version} store; this microlora reads "
                         f"v{' and v'.join(map(str, READ_FORMATS))}: {hint}")
    return StoreHeader(**header)
