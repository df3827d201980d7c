"""Looking after a store: per-namespace statistics (from LMDB's page counts, no scan),
verification of every record's checksum, re-encoding adapters (bf16 to int8, say), and
compaction.

LMDB is copy-on-write: a deleted atom's pages are freed, not overwritten, so its text stays in
``data.mdb`` until later writes reuse them. ``compact`` writes a copy holding only what is
live and swaps it in, which it may do only while no one else has the store open: every
``AdapterStore`` holds a shared ``flock`` on the store's directory, and compaction needs it
exclusively.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from microlora.core.errors import CorruptAtomError, StoreError
from store import record as rec
from store.damage import DAMAGE
from store.index import VectorIndex
from store.layout import DIR_MODE, FILE_MODE
from store.reader import Reader

log = logging.getLogger(__name__)


@dataclass
class NamespaceStats:
    namespace: str
    atoms: int
    bytes: int
    index: str  # "exact", "ivf" or "stale"

    @property
    def bytes_per_atom(self) -> float:
        return self.bytes / self.atoms if self.atoms else 0.0


@dataclass
class VerifyReport:
    checked: int = 0
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (namespace, atom id, why)
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (namespace, why)

    @property
    def ok(self) -> bool:
        return not self.bad and not self.damaged


def hold_shared(path: Path) -> int:
    """A descriptor of the store directory ``path`` with a shared ``flock`` on it, held while
    the store is open (so ``compact`` knows it is not alone)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"store {path} is being compacted; open it again when that is "
                         "done") from None
    except OSError as e:  # a filesystem without locks: the store works, compaction will not
        log.warning("cannot lock store %s (%s); it cannot be compacted here", path, e)
    return fd


class Maintenance:
    """The maintenance half of ``AdapterStore`` (a mixin over its LMDB environment)."""

    def compact(self) -> tuple[int, int]:
        """Rewrite ``data.mdb`` with only its live pages (LMDB's compacting copy, swapped in),
        so forgotten atoms leave no bytes behind, and deleted namespaces free their slots.
        Needs the store to itself: no other process or ``AdapterStore`` may have it open, and
        no transaction of this one may be in flight. Returns the file's bytes before and after.
        """
        self._guard_writable()
        try:
            fcntl.flock(self._hold_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"store {self.path} is open elsewhere (a server, a compile or "
                             "another command): stop it, then compact") from None
        except OSError as e:
            raise StoreError(f"cannot lock store {self.path} ({e}), so cannot tell that no "
                             "one else has it open: compact it on a local filesystem") from e
        try:
            before = self.layout.data_file.stat().st_size
            with self._background.paused(), self._lock:  # no thread reads the old file
                self._drop_deleted_databases()
                tmp = self.path / "compacting"
                shutil.rmtree(tmp, ignore_errors=True)  # what a crash mid-copy left
                tmp.mkdir(mode=DIR_MODE)
                self._env.copy(str(tmp), compact=True)
                self._env.close()
                (tmp / self.layout.data_file.name).chmod(FILE_MODE)
                os.replace(tmp / self.layout.data_file.name, self.layout.data_file)
                tmp.rmdir()
                self._reopen()
        finally:
            fcntl.flock(self._hold_fd, fcntl.LOCK_SH)
        return before, self.layout.data_file.stat().st_size

    def reencode(self, dtype: str, batch: int = 256) -> int:
        """Rewrite every atom whose adapter is not stored as ``dtype`` (int8, bf16 or fp16)
        with its adapter in ``dtype``; ids, text and embeddings stay as they are, so the same
        trained adapters can be compared across storages. Each record's checksum is checked
        before it is rewritten. Returns how many atoms were rewritten; their old pages are
        freed, and ``compact`` gives them back to the filesystem."""
        self._guard_writable()
        dtype, changed = rec.storage(dtype), 0
        for ns in self.namespaces():
            ids, db = self.ids(ns), self._db(ns)
            for start in range(0, len(ids), batch):
                with self._txn(write=True, db=db) as txn:
                    reader, n = Reader(self.path, ns, txn), 0
                    header = self._hold_version(txn, rec.version_for(dtype))
                    for atom_id in ids[start:start + batch]:
                        value = reader._value(atom_id)
                        if rec.stored_dtype(value) != dtype:
                            record = reader.check(atom_id, value, copy=True)
                            txn.put(atom_id.encode(), rec.encode(record, dtype))
                            n += 1
                    if n:  # the bytes under these ids changed: checksums are checked anew
                        self._bump(txn, ns)
                self.header, changed = header, changed + n
        return changed

    def _drop_deleted_databases(self) -> None:
        """Delete the LMDB databases of dropped namespaces (``drop`` only empties them, as
        another thread may still hold their handles; here no one does)."""
        with self._env.begin(write=True) as txn:
            names = [bytes(k) for k, _ in txn.cursor()]  # the main database: every named one
            for name in names:
                if name != b"__meta__" and txn.get(b"ns:" + name, db=self._meta) is None:
                    txn.drop(self._env.open_db(name, txn=txn, create=False), delete=True)
        self._dbs.clear()

    def stats(self) -> list[NamespaceStats]:
        """Per namespace: atoms, bytes of LMDB pages they occupy (from LMDB's page counts, so
        this is O(1), not a scan), and whether the index is fresh."""
        out = []
        for ns in self.namespaces():
            db = self._db(ns)
            with self._txn() as txn:
                st = txn.stat(db)
            n = st["entries"]
            size = st["psize"] * (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"])
            cached = self._indexes.get(ns)
            stamp = {"generation": cached.generation, "kind": cached.kind} if cached else \
                VectorIndex.stamp(self.layout.index(ns))
            fresh = stamp is not None and stamp.get("generation") == self.generation(ns)
            kind = stamp["kind"] if fresh else "stale"
            out.append(NamespaceStats(ns, n, size, kind))
        return out

    def verify(self, namespaces: Sequence[str] | None = None) -> VerifyReport:
        """Recompute every record's checksum (all of them: not trusting what this process
        checked before); report the atoms that fail, by id, and the namespaces whose LMDB
        pages could not be walked to the end."""
        report = VerifyReport()
        for ns in namespaces or self.namespaces():
            with self._txn(db=self._db(ns), buffers=True) as txn:
                reader = Reader(self.path, ns, txn)  # its own set of checked ids: none yet
                walked = 0
                try:
                    for key, value in txn.cursor():
                        walked += 1
                        report.checked += 1
                        atom_id = bytes(key).decode(errors="replace")
                        try:
                            reader.check(atom_id, value)
                        except CorruptAtomError as e:
                            report.bad.append((ns, atom_id, e.problem))
                except DAMAGE as e:
                    report.damaged.append((ns, f"LMDB cannot read its pages after {walked} "
                                               f"atoms ({e})"))
        return report
