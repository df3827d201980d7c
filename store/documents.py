"""Document manifests: which atoms each compiled document produced, kept in the store's
``__meta__`` database, so one document can be forgotten without the atoms another document
of the namespace shares.

A compile writes each manifest in the transaction of the first batch that stores an atom of
the document (``BatchDocuments``), so no stored atom is ever outside every manifest, even
after a ``kill -9``: whatever a compile stored, ``delete_document`` can forget."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from microlora.core.errors import StoreError, UnknownDocumentError

# A manifest's LMDB key is "doc:" + namespace (<= 128 bytes) + NUL + the document id, and LMDB
# refuses keys over 511 bytes: ids stay well inside that.
MAX_DOCUMENT_ID_BYTES = 256


def check_document_id(doc_id: str) -> str:
    """``doc_id``, if the store can keep a manifest under it; StoreError naming it if not."""
    size = len(doc_id.encode())
    if not 0 < size <= MAX_DOCUMENT_ID_BYTES:
        raise StoreError(f"document id {doc_id[:60]!r}{'...' if len(doc_id) > 60 else ''} is "
                         f"{size} bytes; an id (a path relative to the directory compiled, "
                         f"with '#id' for a JSONL row) must be 1-{MAX_DOCUMENT_ID_BYTES} bytes: "
                         "shorten it, or compile from a directory nearer the file")
    return doc_id


@dataclass(frozen=True)
class BatchDocuments:
    """The manifests written with one batch of atoms: every document with an atom in the
    batch, mapped to all its atom ids. ``fresh`` are those this batch registers (their first
    atoms); any other whose manifest is gone was forgotten while it compiled, so its atoms
    in the batch (those no live document shares) are not written."""

    manifests: Mapping[str, list[str]]
    fresh: frozenset[str]


class DocumentManifests:
    """The document half of ``AdapterStore`` (a mixin over its LMDB environment)."""

    def put_documents(self, namespace: str, manifests: dict[str, list[str]]) -> None:
        """Record which atoms each document produced (replacing earlier manifests of the same
        documents), so that ``delete_document`` can forget one document."""
        self._guard_writable()
        self._db(namespace)
        for doc_id in manifests:
            check_document_id(doc_id)
        with self._txn(write=True) as txn:
            for doc_id, atom_ids in manifests.items():
                self._write_manifest(txn, namespace, doc_id, atom_ids)

    def claim_documents(self, namespace: str, manifests: dict[str, list[str]]
                        ) -> set[str] | None:
        """Which atoms of ``manifests`` the namespace holds (None: there is no namespace), and,
        in the same transaction, the manifest of every document that has one of them: so
        forgetting another document while these compile keeps the atoms they share."""
        self._guard_writable()
        if namespace not in self.namespaces():
            return None
        db = self._db(namespace)
        for doc_id in manifests:
            check_document_id(doc_id)
        with self._txn(write=True) as txn:
            present = {a for ids in manifests.values() for a in ids
                       if txn.get(a.encode(), db=db) is not None}
            for doc_id, atom_ids in manifests.items():
                if present.intersection(atom_ids):
                    self._write_manifest(txn, namespace, doc_id, atom_ids)
        return present

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

    def _put_batch_documents(self, txn, namespace: str, docs: BatchDocuments) -> set[str]:
        """Write a batch's manifests inside its transaction ``txn``; returns the ids of the
        atoms not to write (those only of documents forgotten meanwhile)."""
        forgotten = set()
        for doc_id, atom_ids in docs.manifests.items():
            if doc_id in docs.fresh:
                self._write_manifest(txn, namespace, doc_id, atom_ids)
            elif txn.get(_document_key(namespace, doc_id), db=self._meta) is None:
                forgotten.add(doc_id)
        live = {a for d, ids in docs.manifests.items() if d not in forgotten for a in ids}
        return {a for d in forgotten for a in docs.manifests[d]} - live

    def _write_manifest(self, txn, namespace: str, doc_id: str, atom_ids: list[str]) -> None:
        txn.put(_document_key(namespace, check_document_id(doc_id)),
                json.dumps(atom_ids).encode(), db=self._meta)

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
