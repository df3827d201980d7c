"""Pending work that must outlive the process: a server's compile jobs, kept in the store's
own LMDB (the ``__meta__`` database, keys ``job:<namespace>/<id>``).

Why in LMDB and not a sidecar file: a record is written in one transaction like everything
else in the store (whole or not at all, with no temporary-file and fsync ordering to get
right), and ``drop`` deletes a namespace's jobs in the transaction that deletes its atoms, so a
queued job can never bring a forgotten namespace back after a restart, and the document text a
job holds goes where the namespace's text goes (and ``store compact`` scrubs it) instead of
lingering in a file beside the store.

A record is opaque JSON to the store (the server decides what a job holds); ``body`` is an
optional second value written with it, for what is large and written once (the documents),
so that a status change rewrites only the small record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

_JOB = b"job:"
_BODY = b"jobbody:"


class JobTable:
    """The job half of ``AdapterStore`` (a mixin over its LMDB environment)."""

    def put_job(self, namespace: str, job_id: str, record: dict,
                body: dict | None = None) -> None:
        """Write a job's record (replacing it), and its ``body`` if given, in one
        transaction."""
        self._guard_writable()
        with self._txn(write=True) as txn:
            txn.put(_job_key(_JOB, namespace, job_id), json.dumps(record).encode(),
                    db=self._meta)
            if body is not None:
                txn.put(_job_key(_BODY, namespace, job_id), json.dumps(body).encode(),
                        db=self._meta)

    def end_job(self, namespace: str, job_id: str, record: dict | None) -> None:
        """Replace a job's record with ``record`` and delete its body, in one transaction;
        ``record=None`` deletes the job."""
        self._guard_writable()
        with self._txn(write=True) as txn:
            key = _job_key(_JOB, namespace, job_id)
            if record is None:
                txn.delete(key, db=self._meta)
            else:
                txn.put(key, json.dumps(record).encode(), db=self._meta)
            txn.delete(_job_key(_BODY, namespace, job_id), db=self._meta)

    def jobs(self) -> list[tuple[str, str, dict]]:
        """Every stored job: (namespace, id, record)."""
        with self._txn(db=self._meta) as txn:
            return [(*_split(key, _JOB), json.loads(value))
                    for key, value in _items(txn, self._meta, _JOB)]

    def job_body(self, namespace: str, job_id: str) -> dict | None:
        with self._txn(db=self._meta) as txn:
            raw = txn.get(_job_key(_BODY, namespace, job_id))
        return None if raw is None else json.loads(raw)

    def _delete_jobs(self, txn, namespace: str) -> None:
        """Delete every job of ``namespace`` inside write transaction ``txn`` (``drop``)."""
        for prefix in (_JOB, _BODY):
            for key in [k for k, _ in _items(txn, self._meta,
                                             _job_key(prefix, namespace, ""))]:
                txn.delete(key, db=self._meta)


def _job_key(prefix: bytes, namespace: str, job_id: str) -> bytes:
    # '/' is in no namespace name (``validate_namespace``): the split is unambiguous
    return prefix + namespace.encode() + b"/" + job_id.encode()


def _split(key: bytes, prefix: bytes) -> tuple[str, str]:
    namespace, job_id = key[len(prefix):].decode().split("/", 1)
    return namespace, job_id


def _items(txn, db, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    cursor = txn.cursor(db=db)
    if cursor.set_range(prefix):
        for key, value in cursor:
            if not key.startswith(prefix):
                break
            yield bytes(key), bytes(value)
