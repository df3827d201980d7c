"""Looking after a store: per-namespace statistics (from LMDB's page counts, no scan) and
verification of every record's checksum."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from microlora.core.errors import CorruptAtomError
from store.damage import DAMAGE
from store.index import VectorIndex
from store.reader import Reader


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


class Maintenance:
    """The maintenance half of ``AdapterStore`` (a mixin over its LMDB environment)."""

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
