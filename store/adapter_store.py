"""The adapter store: one LMDB environment per directory, one named database per namespace
(the directory's layout: ``store/layout.py``).

The ``__meta__`` database holds the header (format version, base-model and embedder identity),
the namespace registry, a generation counter per namespace that every write bumps (an index
file built from an older generation is stale and rebuilt), a manifest per compiled
document (its atom ids, so a document can be forgotten), and a server's compile jobs
(``store/jobs.py``). Every write is one LMDB transaction: it lands whole or not at all.

One ``AdapterStore`` may be shared by threads (a server answering while it compiles): LMDB
transactions are per thread, and a lock guards the in-memory FAISS indexes. A store opened
with ``background_verify`` runs one thread of its own (``store/background_verify.py``).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np
import torch

from microlora.core.config import MAX_NAMESPACES, StoreConfig
from microlora.core.errors import (
    StoreError,
    StoreMismatchError,
    UnknownNamespaceError,
)
from microlora.core.pack import Packed
from store import record as rec
from store.background_verify import BackgroundVerifier, VerifiedIds, generation_in
from store.damage import damage_explained
from store.documents import BatchDocuments, DocumentManifests
from store.environment import open_environment
from store.header import HEADER_KEY, StoreHeader, parse_header
from store.identity import Identity
from store.index import EXACT_LIMIT, VectorIndex
from store.index_cache import IndexCache
from store.jobs import JobTable
from store.layout import DIR_MODE, FILE_MODE, StoreLayout, is_store
from store.maintenance import Maintenance, hold_shared
from store.peft import read_reader
from store.reader import Reader

_META_DB = b"__meta__"
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")  # fullmatch: "$" allows "\n"
_DEFAULT_MAP_SIZE = 1 << 40  # address space only: the file grows as data is written


def stored_base_dtype(path: str | Path) -> str | None:
    """The quantization the store at ``path`` was compiled against ("int8", "int4"), or
    None: a float base, or no store there yet. What ``--base-dtype`` defaults to."""
    if not is_store(Path(path)):
        return None
    with AdapterStore(path, readonly=True) as store:
        return store.header.base_dtype


def validate_namespace(namespace: str) -> str:
    if not _NAMESPACE_RE.fullmatch(namespace or ""):
        raise StoreError(f"invalid namespace {namespace!r}: use 1-128 letters, digits and "
                         "'._:@-', starting with a letter or digit (e.g. 'docs', 'user:alice')")
    return namespace


class AdapterStore(Identity, DocumentManifests, IndexCache, JobTable, Maintenance):
    """Atoms (adapters + text + embedding) by namespace, with a FAISS index per namespace.

    Open an existing store with ``AdapterStore(path)`` (``readonly=True`` for inspection:
    then nothing on disk changes, not even the index cache), or create one with
    ``AdapterStore.create(path, header)``. ``adapter_dtype``: how ``put`` stores adapters
    (``StoreConfig``); atoms of every kind are read. ``background_verify``: hash each
    namespace's records in a thread once it is first read (``StoreConfig.background_verify``:
    on where a store is opened to serve; off here, as most opens are one-shot commands).
    """

    def __init__(self, path: str | Path, *, readonly: bool = False,
                 max_namespaces: int = MAX_NAMESPACES, map_size: int = _DEFAULT_MAP_SIZE,
                 exact_limit: int = EXACT_LIMIT,
                 adapter_dtype: str = StoreConfig.adapter_dtype,
                 background_verify: bool = False):
        self.path = Path(path)
        self.layout = StoreLayout(self.path)
        self.readonly = readonly
        self.exact_limit = exact_limit
        self.adapter_dtype = rec.storage(StoreConfig(adapter_dtype).adapter_dtype)
        if not is_store(self.path):
            raise StoreError(f"{self.path} is not a microlora store (no data.mdb there); "
                             "create one with `microlora compile ... --store DIR`")
        # held until close (or until this object goes, if opening fails below): ``compact``
        # swaps data.mdb only where no one else holds it
        self._hold_fd = hold_shared(self.path)
        self._release = weakref.finalize(self, os.close, self._hold_fd)
        self._map_size = map_size
        try:
            self._env, self.max_namespaces = open_environment(
                self.path, map_size=map_size, max_namespaces=max_namespaces,
                readonly=readonly)
            self._meta = self._env.open_db(_META_DB, create=False)  # (also ``_reopen``)
            with self._env.begin(db=self._meta) as txn:
                raw = txn.get(HEADER_KEY)
        except lmdb.Error as e:
            raise StoreError(f"{self.path} is not a readable microlora store ({e}); if it was "
                             "one, restore it from a backup or re-compile it") from e
        try:
            if raw is None:
                raise StoreError(f"{self.path} has no microlora header; it is not a microlora "
                                 "store")
            self.header = parse_header(raw, self.path)
        except StoreError:
            self._env.close()
            raise
        self._dbs: dict[str, object] = {}
        self._indexes: dict[str, VectorIndex] = {}
        self._unsaved: set[str] = set()
        self._checked = VerifiedIds()  # the ids whose checksums this process has checked
        self._background = BackgroundVerifier(self, enabled=background_verify)
        self._lock = threading.RLock()  # the cached FAISS indexes and db handles

    @classmethod
    def create(cls, path: str | Path, header: StoreHeader, **kwargs) -> AdapterStore:
        """Create a new store at ``path`` (an empty or missing directory)."""
        path = Path(path)
        if is_store(path):
            raise StoreError(f"{path} is already a store; open it instead of creating it")
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path} is not empty; give a new or empty directory for a store")
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(DIR_MODE)  # also a directory that existed, empty: it is the store now
        env = lmdb.open(str(path), map_size=kwargs.get("map_size", _DEFAULT_MAP_SIZE), max_dbs=2,
                        mode=FILE_MODE)
        with env.begin(write=True) as txn:
            meta = env.open_db(_META_DB, txn=txn)
            txn.put(HEADER_KEY, header.to_bytes(), db=meta)
        env.close()
        return cls(path, **kwargs)

    @classmethod
    def open_or_create(cls, path: str | Path, header: StoreHeader, **kwargs) -> AdapterStore:
        """Open the store at ``path``, creating it if it does not exist; either way check that
        it belongs to ``header``'s base model (and its quantization) and embedder: this is how
        compiling opens a store, so it never adds adapters trained against another base."""
        path = Path(path)
        store = cls(path, **kwargs) if is_store(path) else cls.create(
            path, header, **kwargs)
        try:
            store.check_compatible(header.base_fingerprint, header.embedder_fingerprint,
                                   base_name=header.base_name, embedder_name=header.embedder_name)
            store.check_base_dtype(header.base_dtype, strict=True)
        except StoreMismatchError:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Save the indexes that puts extended in memory, then close LMDB. (A process that dies
        before this leaves index files stamped with an older generation: rebuilt on use.)"""
        self._background.stop()  # joined: no hash may be reading the map LMDB unmaps
        for namespace in sorted(self._unsaved):
            index = self._indexes.get(namespace)
            if index is not None:
                index.save(self.layout.index(namespace))
        self._unsaved.clear()
        self._env.close()
        self._release()

    def _reopen(self) -> None:
        """Open LMDB again after ``compact`` swapped its file (every handle is new)."""
        self._env, self.max_namespaces = open_environment(
            self.path, map_size=self._map_size, max_namespaces=self.max_namespaces,
            readonly=self.readonly)
        self._meta = self._env.open_db(_META_DB, create=False)
        self._dbs = {}

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- namespaces --------------------------------------------------------------------------

    def namespaces(self) -> list[str]:
        with self._txn(db=self._meta) as txn:
            return [k[3:].decode() for k, _ in txn.cursor() if k.startswith(b"ns:")]

    def _db(self, namespace: str):
        """The handle of an existing namespace's database. Whether it exists is asked every
        time: a handle stays cached (and open) after its namespace is dropped (``drop``)."""
        validate_namespace(namespace)
        with self._txn(db=self._meta) as txn:
            known = txn.get(b"ns:" + namespace.encode()) is not None
        if not known:
            raise self._unknown(namespace)
        if namespace not in self._dbs:
            with damage_explained(self.path):
                self._dbs[namespace] = self._open_db(namespace, create=False)
        return self._dbs[namespace]

    def _unknown(self, namespace: str) -> UnknownNamespaceError:
        have = ", ".join(self.namespaces()) or "none"
        return UnknownNamespaceError(f"store {self.path} has no namespace {namespace!r} "
                                     f"(it has: {have})", namespace=namespace)

    def _open_db(self, namespace: str, **kwargs):
        """LMDB's handle of a namespace's database; a clear error past ``max_namespaces``."""
        try:
            return self._env.open_db(namespace.encode(), **kwargs)
        except lmdb.DbsFullError:
            raise StoreError(
                f"store {self.path} holds its limit of {self.max_namespaces} namespaces "
                "(deleted ones count until `microlora store compact`): compact it, or open it "
                "with a larger limit (`microlora serve --max-namespaces`)") from None

    def _db_for_write(self, txn, namespace: str, create: bool = True):
        """The namespace's handle inside write transaction ``txn``, registering the namespace
        if it is new and ``create`` (so a failed first put leaves no empty namespace behind)."""
        validate_namespace(namespace)
        known = txn.get(b"ns:" + namespace.encode(), db=self._meta) is not None
        if not known and not create:
            raise UnknownNamespaceError(f"namespace {namespace!r} was deleted while this was "
                                        "written; nothing of it was kept", namespace=namespace)
        db = self._dbs.get(namespace) or self._open_db(namespace, txn=txn)
        if not known:
            txn.put(b"ns:" + namespace.encode(), b"{}", db=self._meta)
            txn.put(b"gen:" + namespace.encode(), b"0", db=self._meta)
        return db

    def _hold_version(self, txn, record_version: int) -> StoreHeader:
        """The header able to hold ``record_version`` records, written in ``txn`` if the
        format had to rise (``store/header.py``); the caller adopts it once ``txn`` commits."""
        header = self.header.holding(record_version)
        if header != self.header:
            txn.put(HEADER_KEY, header.to_bytes(), db=self._meta)
        return header

    def generation(self, namespace: str) -> int:
        with self._txn(db=self._meta) as txn:
            raw = txn.get(b"gen:" + validate_namespace(namespace).encode())
        if raw is None:
            raise UnknownNamespaceError(f"store {self.path} has no namespace {namespace!r}",
                                        namespace=namespace)
        return int(raw)

    def _bump(self, txn, namespace: str) -> int:
        key = b"gen:" + namespace.encode()
        gen = int(txn.get(key, db=self._meta)) + 1
        txn.put(key, str(gen).encode(), db=self._meta)
        return gen

    def drop(self, namespace: str) -> int:
        """Delete a namespace with all its atoms and its index; returns how many atoms.

        The database is emptied, not deleted, and its handle stays open: another thread may
        be reading through it (LMDB forbids closing a handle in use), and LMDB gives a closed
        handle's slot to the next database opened, so a handle taken before the drop would
        then read another namespace's atoms. Its name stays in LMDB's catalogue, unlisted."""
        self._guard_writable()
        with self._lock:
            db = self._db(namespace)
            with self._txn(write=True) as txn:
                n = txn.stat(db)["entries"]
                txn.drop(db, delete=False)
                txn.delete(b"ns:" + namespace.encode(), db=self._meta)
                txn.delete(b"gen:" + namespace.encode(), db=self._meta)
                for key in list(self._document_keys(txn, namespace)):
                    txn.delete(key, db=self._meta)
                self._delete_jobs(txn, namespace)  # none may bring it back after a restart
            self._indexes.pop(namespace, None)
            self._unsaved.discard(namespace)
            # a namespace made anew restarts at generation 0: no check of this one counts
            self._checked.forget(namespace, self._env.info()["last_txnid"])
            VectorIndex.remove(self.layout.index(namespace))
        return n

    # -- atoms -------------------------------------------------------------------------------

    def put(self, namespace: str, records: Iterable[rec.AtomRecord],
            dtype: str | torch.dtype | None = None, *, documents: BatchDocuments | None = None,
            create: bool = True, check: Callable[[], None] | None = None) -> int:
        """Add atoms in one transaction; atoms already present (same id) are kept as they are.
        Returns how many were new. ``dtype``: how their adapters are stored (int8, bf16 or
        fp16; default the store's ``adapter_dtype``).

        ``documents``: the manifests to write in the same transaction. ``create=False``: the
        namespace must exist (UnknownNamespaceError if it was dropped meanwhile: a compile
        never brings back a namespace deleted under it). ``check()`` runs inside the
        transaction, before anything is written; what it raises aborts the batch (a server job
        cancelled: the cancel and a drop cannot interleave with the write)."""
        self._guard_writable()
        records, dtype = list(records), rec.storage(dtype or self.adapter_dtype)
        for r in records:  # check everything before writing anything
            if r.base_fingerprint != self.header.base_fingerprint:
                raise StoreMismatchError(
                    f"atom {r.id} belongs to base model {r.base_fingerprint[:12]}, but store "
                    f"{self.path} holds adapters for {self.header.base_fingerprint[:12]}")
            if np.asarray(r.embedding).size != self.header.embedding_dim:
                raise StoreError(f"atom {r.id} has a {np.asarray(r.embedding).size}-d embedding;"
                                 f" the store's embedder gives {self.header.embedding_dim}-d")
            if not 0 < len(r.id.encode()) <= 256:
                raise StoreError(f"atom id {r.id[:40]!r} must be 1-256 bytes")
            # a NaN composed into a batch makes every answer of it empty: never store one
            # (checked as stored: a value finite in fp32 may overflow fp16)
            for part, finite in (("adapter", rec.finite_as_stored(r.adapter, dtype)),
                                 ("embedding", np.isfinite(r.embedding).all())):
                if not finite:
                    raise StoreError(f"atom {r.id} ({r.source or 'no source'}: {r.text[:60]!r}) "
                                     f"has NaN or inf values in its {part}; nothing of this "
                                     "batch was written")
        values = [(r.id.encode(), v) for r, v in zip(records, rec.encode_many(records, dtype))]
        added: list[rec.AtomRecord] = []
        try:
            with self._txn(write=True) as txn:
                if check is not None:
                    check()
                db = self._db_for_write(txn, namespace, create)
                header = self._hold_version(txn, rec.version_for(dtype))
                skip = self._put_batch_documents(txn, namespace, documents) if documents \
                    else set()
                for r, (key, value) in zip(records, values):
                    if r.id not in skip and txn.put(key, value, db=db, overwrite=False):
                        added.append(r)
                gen_before = int(txn.get(b"gen:" + namespace.encode(), db=self._meta))
                gen = self._bump(txn, namespace) if added else gen_before
        except lmdb.MapFullError as e:
            raise StoreError(f"store {self.path} reached its map size ({e}); nothing from this "
                             "batch was written. Open it with a larger map_size") from e
        self._dbs[namespace], self.header = db, header  # only now: the txn committed
        if added:
            self._extend_index(namespace, added, gen_before, gen)
        return len(added)

    def delete(self, namespace: str, ids: Iterable[str]) -> int:
        """Delete atoms by id in one transaction; returns how many existed."""
        self._guard_writable()
        db = self._db(namespace)
        with self._txn(write=True) as txn:
            n = sum(txn.delete(i.encode(), db=db) for i in ids)
            if n:
                self._bump(txn, namespace)
        if n:
            self._forget_index(namespace)
        return n

    def ids(self, namespace: str) -> list[str]:
        db = self._db(namespace)
        with self._txn(db=db) as txn:
            return [k.decode() for k in txn.cursor().iternext(keys=True, values=False)]

    def count(self, namespace: str) -> int:
        db = self._db(namespace)  # open the handle before the transaction that uses it
        with self._txn() as txn:
            return txn.stat(db)["entries"]

    def get(self, namespace: str, ids: Sequence[str]) -> list[rec.AtomRecord]:
        """Records by id, with tensors copied out of the store (safe to keep)."""
        with self.read(namespace) as reader:
            return [reader.get(i, copy=True) for i in ids]

    @contextmanager
    def read(self, namespace: str) -> Iterator[Reader]:
        """A read transaction: ``reader.get(id)`` returns zero-copy views into the memory map
        (int8 adapters: dequantized copies), valid until the ``with`` block ends."""
        # a handle is opened before the transaction that uses it; once it is, whether the
        # namespace still exists is asked inside that transaction (a fetch opens one, not two)
        db = self._dbs.get(namespace) or self._db(namespace)
        with self._txn(db=db, buffers=True) as txn:
            if txn.get(b"ns:" + namespace.encode(), db=self._meta) is None:
                raise self._unknown(namespace)
            checked, new = self._checked.of(namespace, generation_in(txn, self._meta, namespace),
                                            txn.id())
            if new:  # the first read of this generation: check the rest in the background
                self._background.request([namespace])
            yield Reader(self.path, namespace, txn, checked.ids)

    def verify_in_background(self, namespaces: Iterable[str] | None = None) -> None:
        """Queue namespaces (default: all) for the background checksum pass, as a server does
        when it opens its store; nothing if the store was opened without ``background_verify``.
        """
        self._background.request(self.namespaces() if namespaces is None else namespaces)

    def wait_verified(self, timeout: float | None = None) -> bool:
        """Wait for the background checksum pass to finish what is queued; False on timeout."""
        return self._background.wait(timeout)

    @contextmanager
    def _txn(self, **kwargs) -> Iterator[lmdb.Transaction]:
        """``Environment.begin(**kwargs)``, with LMDB's errors for a damaged file, raised in
        the body or by LMDB, explained as a ``StoreError``."""
        with damage_explained(self.path), self._env.begin(**kwargs) as txn:
            yield txn

    def _guard_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"store {self.path} is open read-only")

    # -- the reader adapter ------------------------------------------------------------------

    def reader(self) -> tuple[Packed, dict] | None:
        """The store's reader adapter and its info (``compiler.reader``), or None."""
        if not self.layout.reader_dir.is_dir():
            return None
        return read_reader(self.layout.reader_dir, self.header.base_fingerprint)

    def install_reader(self, folder: str | Path) -> dict:
        """Copy a reader folder (``microlora reader train``) into the store, after checking
        it belongs to the store's base model; returns its info."""
        _, info = read_reader(folder, self.header.base_fingerprint)
        target = self.layout.reader_dir
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(folder, target)
        return info
