"""Looking after a store: per-namespace statistics (from LMDB's page counts, no scan) and
verification of every record's checksum."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from microlora.core.errors import StoreError
from store import record as rec
from store.index import VectorIndex


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

    @property
    def ok(self) -> bool:
        return not self.bad


class Maintenance:
    """The maintenance half of ``AdapterStore`` (a mixin over its LMDB environment)."""

    def stats(self) -> list[NamespaceStats]:
        """Per namespace: atoms, bytes of LMDB pages they occupy (from LMDB's page counts, so
        this is O(1), not a scan), and whether the index is fresh."""
        out = []
        for ns in self.namespaces():
            db = self._db(ns)
            with self._env.begin() as txn:
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
        """Recompute every record's checksum; report the atoms that fail, by id."""
        report = VerifyReport()
        for ns in namespaces or self.namespaces():
            with self._env.begin(db=self._db(ns), buffers=True) as txn:
                for key, value in txn.cursor():
                    report.checked += 1
                    problem = rec.verify(value)
                    if problem is None:
                        try:
                            r = rec.decode(value, copy=False)
                        except StoreError as e:
                            problem = str(e)
                        else:
                            if r.id != bytes(key).decode():
                                problem = f"stored under {bytes(key).decode()} but holds {r.id}"
                    if problem:
                        report.bad.append((ns, bytes(key).decode(errors="replace"), problem))
        return report
