"""Zero-copy reads of one namespace inside an LMDB read transaction."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from microlora.core.errors import StoreError
from store import record as rec


class Reader:
    """Zero-copy access to one namespace inside a read transaction (see ``AdapterStore.read``)."""

    def __init__(self, store_path: Path, namespace: str, txn):
        self._path, self.namespace, self._txn = store_path, namespace, txn

    def __contains__(self, atom_id: str) -> bool:
        return self._txn.get(atom_id.encode()) is not None

    def get(self, atom_id: str, *, copy: bool = False) -> rec.AtomRecord:
        value = self._value(atom_id)
        with self._explained(atom_id):
            return rec.decode(value, copy=copy)

    def gather(self, ids: Sequence[str], *, copy: bool = False) -> list[rec.AtomRecord]:
        """The records of ``ids``, in order, from this one transaction: text, provenance and
        packed adapter together (zero-copy views valid inside this ``with`` block unless
        ``copy``). ``microlora.core.pack.compose`` turns their adapters into the kernel's
        per-request tensors with one copy."""
        return [self.get(atom_id, copy=copy) for atom_id in ids]

    def items(self) -> Iterator[tuple[str, rec.AtomRecord]]:
        for key, value in self._txn.cursor():
            atom_id = bytes(key).decode()
            with self._explained(atom_id):
                record = rec.decode(value, copy=False)
            yield atom_id, record

    def _value(self, atom_id: str):
        value = self._txn.get(atom_id.encode())
        if value is None:
            raise StoreError(f"atom {atom_id} is not in namespace {self.namespace!r} of "
                             f"store {self._path}")
        return value

    @contextmanager
    def _explained(self, atom_id: str) -> Iterator[None]:
        try:
            yield
        except StoreError as e:
            raise StoreError(f"atom {atom_id} in {self.namespace!r} is corrupt ({e}); "
                             "run `microlora store verify` and re-compile it") from e
