"""A store's header: what it is for (the base model and embedder its atoms belong to) and its
format version, kept under ``__meta__``/``header``.

Format versions: 1 holds version 1 records only (bf16 or fp16 adapters) and a float base; 2
may also hold version 2 records (int8 adapters, ``store/record.py``) and name a quantized base
(``base_dtype``). This microlora reads both. A new store
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
    """What a store is for: the base model and embedder every adapter in it belongs to.

    base_dtype: "int8" or "int4" when its adapters were trained against a weight-only
    quantized base (``--base-dtype``), None for a float one (fp32 or bf16). Not part of the
    fingerprint (nor so of atom ids): the fingerprint names the checkpoint (fp32 and bf16
    loads already share it), and the same checkpoint rounded to int8 computes nearly the same
    function, where another checkpoint's adapters are garbage. Answering with another
    precision than the store was compiled with is a legitimate choice (compile in bf16 on a
    GPU, serve from int8 on a CPU): ``ask`` loads the store's dtype unless told otherwise, and
    warns when told otherwise. Compiling into a store refuses another dtype
    (``AdapterStore.check_base_dtype``), so one store never mixes adapters trained against
    two. A store with a base_dtype is format 2 at least, which a microlora from before
    quantization refuses ("upgrade microlora") rather than answer from with a float base.
    """

    base_fingerprint: str
    base_name: str
    embedder_fingerprint: str
    embedder_name: str
    embedding_dim: int
    format_version: int = FORMAT_VERSION
    base_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.base_dtype is not None and self.format_version < 2:
            object.__setattr__(self, "format_version", 2)

    def to_bytes(self) -> bytes:
        d = asdict(self)
        if d["base_dtype"] is None:  # a float base: the header reads as before quantization
            d.pop("base_dtype")
        return json.dumps(d).encode()

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
