"""Document manifests: which atoms each compiled document produced, kept in the store's
``__meta__`` database, so one document can be forgotten without the atoms another document
of the namespace shares."""

from __future__ import annotations

import json
from collections.abc import Iterator

from microlora.core.errors import UnknownDocumentError


class DocumentManifests:
    """The document half of ``AdapterStore`` (a mixin over its LMDB environment)."""

    def put_documents(self, namespace: str, manifests: dict[str, list[str]]) -> None:
        """Record which atoms each document produced (replacing earlier manifests of the same
        documents), so that ``delete_document`` can forget one document."""
        self._guard_writable()
        self._db(namespace)
        with self._txn(write=True) as txn:
            for doc_id, atom_ids in manifests.items():
                txn.put(_document_key(namespace, doc_id), json.dumps(atom_ids).encode(),
                        db=self._meta)

    def documents(self, namespace: str) -> dict[str, list[str]]:
        """Document id -> the ids of the atoms it produced."""
        self._db(namespace)
        with self._txn(db=self._meta) as txn:
            return {key.split(b"\x00", 1)[1].decode(): json.loads(value)
                    for key, value in self._document_items(txn, namespace)}

    def delete_document(self, namespace: str, doc_id: str) -> int:
        """Forget a document: its manifest and every atom of it that no other document of the
        namespace also produced, in one transaction. Returns how many atoms were deleted."""
        self._guard_writable()
        db = self._db(namespace)
        key = _document_key(namespace, doc_id)
        with self._txn(write=True) as txn:
            raw = txn.get(key, db=self._meta)
            if raw is None:
                raise UnknownDocumentError(f"namespace {namespace!r} has no document {doc_id!r}")
            txn.delete(key, db=self._meta)
            shared = {a for _, value in self._document_items(txn, namespace)
                      for a in json.loads(value)}
            n = sum(txn.delete(a.encode(), db=db) for a in json.loads(raw) if a not in shared)
            if n:
                self._bump(txn, namespace)
        if n:
            self._forget_index(namespace)
        return n

    def _document_items(self, txn, namespace: str) -> Iterator[tuple[bytes, bytes]]:
        prefix = _document_key(namespace, "")
        cursor = txn.cursor(db=self._meta)
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not key.startswith(prefix):
                    break
                yield key, value

    def _document_keys(self, txn, namespace: str) -> Iterator[bytes]:
        return (key for key, _ in self._document_items(txn, namespace))


def _document_key(namespace: str, doc_id: str) -> bytes:
    return b"doc:" + namespace.encode() + b"\x00" + doc_id.encode()
