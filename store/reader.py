"""Zero-copy reads of one namespace inside an LMDB read transaction, each record's checksum
verified the first time this process reads it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from microlora.core.errors import CorruptAtomError, StoreError
from store import record as rec


class Reader:
    """Zero-copy access to one namespace inside a read transaction (see ``AdapterStore.read``).

    ``verified``: the ids whose checksums this process has already checked in this
    generation of the namespace (the store keeps one set per generation and shares it among
    its readers and its background thread, ``store/background_verify.py``). Hashing a
    record costs about as much as fetching it, so each one is hashed once, not at every
    question; a record read for the first time is hashed before use.
    """

    def __init__(self, store_path: Path, namespace: str, txn, verified: set[str] | None = None):
        self._path, self.namespace, self._txn = store_path, namespace, txn
        self._verified = set() if verified is None else verified

    def __contains__(self, atom_id: str) -> bool:
        return self._txn.get(atom_id.encode()) is not None

    def get(self, atom_id: str, *, copy: bool = False) -> rec.AtomRecord:
        """The record (``CorruptAtomError`` if it fails its checksum or does not decode)."""
        return self.check(atom_id, self._value(atom_id), copy=copy)

    def gather(self, ids: Sequence[str], *, copy: bool = False,
               on_corrupt: Callable[[CorruptAtomError], None] | None = None
               ) -> list[rec.AtomRecord]:
        """The records of ``ids``, in order, from this one transaction: text, provenance and
        packed adapter together (zero-copy views valid inside this ``with`` block unless
        ``copy``; a fetch's int8 adapters are dequantized together, rows of one new block).
        ``microlora.core.pack.compose`` turns their adapters into the kernel's per-request
        tensors. With ``on_corrupt``, a corrupt record is handed to it and left out instead of
        failing the whole gather."""
        parsed = (self._kept(i, self._value(i), on_corrupt) for i in ids)
        return rec.build([p for p in parsed if p is not None], copy=copy)

    def items(self, *, on_corrupt: Callable[[CorruptAtomError], None] | None = None
              ) -> Iterator[tuple[str, rec.AtomRecord]]:
        """Every record, decoded but not hashed (zero-copy, valid inside this ``with`` block);
        with ``on_corrupt``, one that does not decode is handed to it and left out."""
        for atom_id, parsed in self._parsed_all(on_corrupt):
            yield atom_id, rec.build([parsed], copy=False)[0]

    def embeddings(self, *, on_corrupt: Callable[[CorruptAtomError], None] | None = None
                   ) -> Iterator[tuple[str, np.ndarray]]:
        """Every atom's embedding, copied (what an index rebuild reads): no adapter is
        dequantized, and nothing of the map is kept alive. A view would pin its record's
        decoding objects, ~12 KB an atom (20 GB for a million)."""
        for atom_id, parsed in self._parsed_all(on_corrupt):
            yield atom_id, parsed.embedding.copy()

    def _parsed_all(self, on_corrupt: Callable[[CorruptAtomError], None] | None
                    ) -> Iterator[tuple[str, rec.Parsed]]:
        for key, value in self._txn.cursor():
            atom_id = bytes(key).decode(errors="replace")
            parsed = self._kept(atom_id, value, on_corrupt, checksum=False)
            if parsed is not None:
                yield atom_id, parsed

    def _value(self, atom_id: str):
        value = self._txn.get(atom_id.encode())
        if value is None:
            raise StoreError(f"atom {atom_id} is not in namespace {self.namespace!r} of "
                             f"store {self._path}")
        return value

    def _kept(self, atom_id: str, value, on_corrupt: Callable[[CorruptAtomError], None] | None,
              checksum: bool = True) -> rec.Parsed | None:
        """``_checked``'s parsed record, or None for a corrupt one handed to ``on_corrupt``."""
        try:
            return self._checked(atom_id, value, checksum)
        except CorruptAtomError as e:
            if on_corrupt is None:
                raise
            on_corrupt(e)
            return None

    def check(self, atom_id: str, value, *, copy: bool = False,
              checksum: bool = True) -> rec.AtomRecord:
        """The record stored under ``atom_id``, checked: its checksum (unless ``checksum`` is
        False, or this process has checked it in this generation already), that it decodes,
        and that it is the atom its key names."""
        return rec.build([self._checked(atom_id, value, checksum)], copy=copy)[0]

    def _checked(self, atom_id: str, value, checksum: bool) -> rec.Parsed:
        try:
            if checksum and atom_id not in self._verified:
                problem = rec.verify(value)
                if problem is not None:
                    raise StoreError(problem)
            parsed = rec.parse(value)
            if parsed.id != atom_id:
                raise StoreError(f"stored under {atom_id} but holds {parsed.id}")
        except StoreError as e:
            raise corrupt_atom(self._path, self.namespace, atom_id, str(e)) from e
        if checksum:
            self._verified.add(atom_id)
        return parsed


def corrupt_atom(store_path: Path, namespace: str, atom_id: str,
                 problem: str) -> CorruptAtomError:
    """The error a read of a corrupt atom raises (and the background check logs: the same
    words wherever it is found)."""
    return CorruptAtomError(
        f"atom {atom_id} in {namespace!r} is corrupt ({problem}); run `microlora store "
        f"verify --store {store_path}` and re-compile it",
        namespace=namespace, atom_id=atom_id, problem=problem)
