"""Which atoms' checksums this process has checked, and a thread that checks them before the
questions that read them do.

A record's checksum is checked the first time this process reads it (``store/reader.py``), and
hashing a record costs about as much as fetching it, so first reads set a fetch's p99. With
``StoreConfig.background_verify`` a daemon thread hashes a namespace's records once it is first
read (or when a server opens the store), in small batches, each in a read transaction of its
own, and adds the intact ones to the set the readers consult. A read that reaches an atom first
still checks it itself. A record that fails its checksum is logged in the words a read uses
and left out of the set, so every read of it still reports it, as before.

Threads and LMDB: py-lmdb opens every environment with MDB_NOTLS, so a read transaction
belongs to its object, not to its thread, and this thread's transactions sit beside the
readers' (one more slot in LMDB's reader table while a batch is read). Hashing reads LMDB's
memory map with the GIL released (hashlib drops it for large buffers), so the thread must be
stopped before the environment closes: ``AdapterStore.close`` and ``compact`` do.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from microlora.core.errors import StoreError, UnknownNamespaceError
from store import page_cache
from store import record as rec
from store.index import VectorIndex
from store.reader import corrupt_atom

if TYPE_CHECKING:
    from store.adapter_store import AdapterStore

log = logging.getLogger(__name__)

BATCH = 16  # records per read transaction: about 2 ms of hashing for int8 adapters
PAUSE_S = 0.001  # between batches: the foreground threads get the GIL and the core back


def generation_in(txn, meta, namespace: str) -> int:
    """The namespace's generation as transaction ``txn`` sees it (-1: it has none there)."""
    raw = txn.get(b"gen:" + namespace.encode(), db=meta)
    return -1 if raw is None else int(bytes(raw))


class Checked:
    """The ids of one namespace whose checksums this process checked in generation ``gen``
    (any write may replace an atom's bytes under the same id: a new generation starts over)."""

    __slots__ = ("gen", "ids")

    def __init__(self, gen: int):
        self.gen: int = gen
        self.ids: set[str] = set()


class VerifiedIds:
    """Per namespace, the ``Checked`` ids of its current generation, shared by every reader of
    one store and its background thread. A set is only added to (``add`` and ``update`` are
    atomic in CPython); the lock makes replacing a namespace's entry, and the background
    thread's check-then-add, atomic with respect to each other."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Checked] = {}
        self._dropped_at: dict[str, int] = {}  # namespace -> LMDB txn id at its last drop

    def of(self, namespace: str, gen: int, txn_id: int) -> tuple[Checked, bool]:
        """The entry a read transaction that sees generation ``gen`` (LMDB snapshot
        ``txn_id``) checks and adds to, and whether it was made just now. One that began
        before the namespace was dropped here gets an entry shared with no one: a namespace
        made anew counts its generations from 0 again, and what it checked in the old one
        must not pass for checked in the new one."""
        with self._lock:
            if txn_id < self._dropped_at.get(namespace, 0):
                return Checked(gen), False
            entry = self._entries.get(namespace)
            if entry is None or entry.gen != gen:
                entry = self._entries[namespace] = Checked(gen)
                return entry, True
            return entry, False

    def add(self, namespace: str, entry: Checked, ids: Iterable[str]) -> bool:
        """Add ``ids`` to ``entry`` if it is still the namespace's; False if it is not (a new
        generation, or the namespace was dropped: these checks are worth nothing now)."""
        with self._lock:
            if self._entries.get(namespace) is not entry:
                return False
            entry.ids.update(ids)
            return True

    def forget(self, namespace: str, last_txn_id: int) -> None:
        """The namespace was dropped in a write transaction with an id up to ``last_txn_id``
        (LMDB's last committed one after the drop): forget its checks, and give none to a
        transaction that still sees it as it was."""
        with self._lock:
            self._entries.pop(namespace, None)
            self._dropped_at[namespace] = last_txn_id


class BackgroundVerifier:
    """The thread that checks one store's namespaces, queued by ``request``; it ends when its
    queue is empty (a later request starts another) and on ``stop``. Disabled (the store
    opened without ``background_verify``), it starts nothing."""

    def __init__(self, store: AdapterStore, *, enabled: bool, batch: int = BATCH,
                 pause_s: float = PAUSE_S):
        self._store, self.enabled, self._batch, self._pause_s = store, enabled, batch, pause_s
        self._cond = threading.Condition()
        self._queue: dict[str, None] = {}  # namespaces to check, in order asked
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._warmed = False  # indexes held in memory, LMDB's file read ahead (once per open)
        if enabled:
            _LIVE.add(self)

    @property
    def thread(self) -> threading.Thread | None:
        """The running thread, if any (tests and ``wait`` look at it)."""
        return self._thread

    def request(self, namespaces: Iterable[str]) -> None:
        """Check these namespaces' records in the background (after those asked before)."""
        if not self.enabled:
            return
        with self._cond:
            if self._stop.is_set():
                return
            self._queue.update(dict.fromkeys(namespaces))
            if self._queue and self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, daemon=True,
                    name=f"microlora-verify {self._store.path.name}")
                self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the thread has ended (nothing left to check, or stopped); False if
        ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._thread is None, timeout)

    def stop(self) -> None:
        """Stop the thread after the batch in hand and join it; nothing starts again."""
        self._stop.set()
        with self._cond:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No thread in the body (``compact`` swaps LMDB's file); what was queued, and the
        namespace in hand, are checked after it."""
        self.stop()
        try:
            yield
        finally:
            self._stop.clear()
            with self._cond:
                queued = list(self._queue)
                self._queue.clear()
            self.request(queued)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop.is_set() or not self._queue:
                    self._thread = None
                    self._cond.notify_all()
                    return
                namespace = next(iter(self._queue))
                del self._queue[namespace]
            try:
                self._warm()
                done = self._check(namespace)
            except Exception:  # a bug here must not end the thread unseen, nor the server
                log.exception("the background checksum pass over %r failed", namespace)
                done = True
            if not done:  # stopped in the middle: resumed after a pause
                with self._cond:
                    self._queue = {namespace: None, **self._queue}

    def _warm(self) -> None:
        """Before the first check, once: each namespace's index read into memory where it fits
        (``IndexCache.hold_index_in_memory``), then LMDB's file read into the page cache where
        it fits (``store/page_cache.py``): questions then find their lists and atoms in
        memory, and the checks below read from it."""
        if self._warmed:
            return
        self._warmed = True
        store = self._store
        for namespace in store.namespaces():
            if self._stop.is_set():
                return
            store.hold_index_in_memory(namespace)
        data = [store.layout.data_file]
        if page_cache.fits(data):
            page_cache.read_through(data, self._stop)

    def _check(self, namespace: str) -> bool:
        """Check every record of ``namespace`` not yet checked in its current generation;
        False if stopped before the end. Ends early (True) when the generation moves on: the
        next first read of the new one asks again."""
        store = self._store
        try:
            db = store._db(namespace)
            with store._txn(db=db) as txn:
                gen = generation_in(txn, store._meta, namespace)
                entry, _ = store._checked.of(namespace, gen, txn.id())
            ids = self._ids(namespace, gen)
            todo = [i for i in ids if i not in entry.ids]
            for start in range(0, len(todo), self._batch):
                if self._stop.wait(self._pause_s):
                    return False
                good = []
                with store._txn(db=db, buffers=True) as txn:
                    if generation_in(txn, store._meta, namespace) != gen:
                        return True
                    for atom_id in todo[start:start + self._batch]:
                        value = txn.get(atom_id.encode())
                        if value is None or atom_id in entry.ids:
                            continue
                        problem = rec.verify(value)
                        if problem is None:
                            good.append(atom_id)
                        else:  # reads of it report it, as they did before this thread
                            log.warning("%s (found by the background checksum pass)",
                                        corrupt_atom(store.path, namespace, atom_id, problem))
                if not store._checked.add(namespace, entry, good):
                    return True
        except UnknownNamespaceError:
            return True  # dropped meanwhile
        except StoreError as e:  # LMDB's damage, explained: reads will say it too
            log.warning("the background checksum pass over %r stopped: %s", namespace, e)
        return True

    def _ids(self, namespace: str, gen: int) -> list[str]:
        """The namespace's atom ids: from its FAISS index when that is of this generation (in
        memory once a question searched it, or its file), else from LMDB's keys (a walk: LMDB
        ends the process where a walk steps onto a damaged page, ``store/damage.py``; reads
        by key, as a question's, only raise)."""
        index = self._store._indexes.get(namespace)
        if index is not None and index.generation == gen:
            return index.all_ids()
        stored = VectorIndex.stored_ids(self._store.layout.index(namespace), gen)
        if stored is not None:
            return stored
        return self._store.ids(namespace)  # a to-do list: an id gone since is skipped


_LIVE: weakref.WeakSet[BackgroundVerifier] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """At exit, before the interpreter tears down: no hash may be reading a memory map then."""
    for verifier in list(_LIVE):
        verifier.stop()
