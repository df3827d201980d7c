"""The FAISS index of each namespace, cached beside LMDB: loaded from ``index/`` when its
generation stamp matches the namespace's, extended in memory as atoms are put, rebuilt from
LMDB when stale (see ``store/index.py``)."""

from __future__ import annotations

import logging

import numpy as np

from microlora.core.errors import CorruptAtomError, UnknownNamespaceError
from store import page_cache
from store import record as rec
from store.index import VectorIndex

log = logging.getLogger(__name__)

IN_MEMORY_SHARE = 0.25  # of available memory an index read into memory may take (it stays)


class IndexCache:
    """The search half of ``AdapterStore`` (a mixin over its LMDB environment)."""

    def search(self, namespace: str, queries: np.ndarray, k: int
               ) -> list[list[tuple[str, float]]]:
        """Top-k atoms (id, cosine) for each query vector, best first."""
        with self._lock:  # FAISS indexes are not safe to search while another thread adds
            return self.index(namespace).search(queries, k)

    def index(self, namespace: str) -> VectorIndex:
        """The namespace's FAISS index, rebuilt from LMDB if the cached one is stale."""
        with self._lock:
            return self._fresh_index(namespace)

    def _fresh_index(self, namespace: str) -> VectorIndex:
        gen = self.generation(namespace)
        cached = self._indexes.get(namespace)
        if cached is None or cached.generation != gen:
            cached = VectorIndex.load(self.layout.index(namespace))
        if cached is None or cached.generation != gen:
            cached = self._rebuild_index(namespace, gen)
        self._indexes[namespace] = cached
        return cached

    def hold_index_in_memory(self, namespace: str, share: float = IN_MEMORY_SHARE) -> bool:
        """Swap the namespace's memory-mapped index for a copy read into memory, if its files
        take at most ``share`` of the memory available; True if it did. FAISS searches a
        memory-mapped IVF index of a million atoms 2.6x slower than one in memory on these
        machines, even with every page cached (benchmarks/RESULTS.md, "Scale"); a server
        (``StoreConfig.background_verify``) pays the memory for its questions' speed, while
        one-shot commands keep the map, which opens in milliseconds."""
        path = self.layout.index(namespace)
        files = VectorIndex.files(path)
        if not files or not page_cache.fits(files, share):
            return False
        loaded = VectorIndex.load(path, mmap=False)  # outside the lock: a second at a million
        with self._lock:
            cached = self._indexes.get(namespace)
            try:
                fresh = loaded is not None and loaded.generation == self.generation(namespace)
            except UnknownNamespaceError:
                return False
            if not fresh or (cached is not None and not cached.mapped):
                return False  # changed meanwhile, or already built or extended in memory
            self._indexes[namespace] = loaded
        return True

    def _rebuild_index(self, namespace: str, gen: int) -> VectorIndex:
        ids, vectors = [], []
        with self.read(namespace) as reader:
            for atom_id, vector in reader.embeddings(on_corrupt=_left_out):
                ids.append(atom_id)
                vectors.append(vector)
        mat = np.stack(vectors) if vectors else np.zeros((0, self.header.embedding_dim),
                                                         np.float32)
        index = VectorIndex.build(mat, ids, gen, self.exact_limit)
        if not self.readonly:
            index.save(self.layout.index(namespace))
        return index

    def _forget_index(self, namespace: str) -> None:
        """Atoms were deleted: the cached index still holds their ids and vectors, in memory
        and on disk. Drop both now (it is rebuilt from LMDB on next use), so a forgotten
        atom's embedding does not outlive its deletion in a stale index file."""
        with self._lock:
            self._indexes.pop(namespace, None)
            self._unsaved.discard(namespace)
            VectorIndex.remove(self.layout.index(namespace))

    def _extend_index(self, namespace: str, added: list[rec.AtomRecord], gen_before: int,
                      gen: int) -> None:
        """Append new atoms to an up-to-date index instead of rebuilding it. An exact index
        that grows past the limit is rebuilt as IVF on its next use."""
        with self._lock:
            self._extend_cached_index(namespace, added, gen_before, gen)

    def _extend_cached_index(self, namespace: str, added: list[rec.AtomRecord], gen_before: int,
                             gen: int) -> None:
        index = self._indexes.get(namespace) or VectorIndex.load(self.layout.index(namespace))
        if index is None or index.generation != gen_before or (
                index.exact and len(index.ids) + len(added) > self.exact_limit):
            return  # stale or changing kind: rebuilt lazily by index()
        index.add(np.stack([np.asarray(r.embedding, np.float32).reshape(-1) for r in added]),
                  [r.id for r in added], gen)
        self._indexes[namespace] = index
        self._unsaved.add(namespace)  # saved on close(): saving after every put is O(n^2)


def _left_out(e: CorruptAtomError) -> None:
    log.warning("%s; it is left out of the index", e)
