"""The FAISS index of one namespace: atom embeddings -> atom ids.

LMDB is the source of truth; an index is a cache stamped with the namespace generation it was
built from, rebuilt whenever the generations disagree. Up to ``exact_limit`` atoms it is exact
(flat inner product, i.e. cosine on unit vectors). Above, it is IVF: ``nlist`` = 4·sqrt(n)
k-means cells trained on a seeded sample of 40 vectors per cell, searched ``nprobe`` = 32 cells
at a time, each atom's vector kept in fp16 (its residual from its cell's centre): half the
bytes a search scans, at the recall of float32 vectors (benchmarks/RESULTS.md, "Scale";
recall@8 vs exact is measured in ``benchmarks/scale_bench.py``). IVF builds in seconds where
HNSW took minutes per million atoms, and its file can be memory-mapped, so a store of a million
atoms opens in milliseconds rather than reading a gigabyte. An index built by an earlier version
(IVF-Flat, float32 vectors) loads and searches as before.

On disk, per namespace (written atomically: temporary files renamed, the stamp last)::

    <name>.faiss   the FAISS index (faiss' own format; memory-mapped for reading)
    <name>.ids     atom ids, one fixed-width byte row per index row (a .npy, memory-mapped)
    <name>.json    the stamp: generation, count, kind
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from store.layout import DIR_MODE, FILE_MODE

EXACT_LIMIT = 50_000
IVF_CELLS_PER_SQRT_N = 4  # nlist = 4 * sqrt(n)
IVF_TRAIN_PER_CELL = 40  # k-means sample: 40 vectors per cell
IVF_NPROBE = 32  # cells searched per query: recall vs latency
_SUFFIXES = (".faiss", ".ids", ".json")


@dataclass
class VectorIndex:
    index: faiss.Index
    ids: np.ndarray | list[str]  # row -> atom id (bytes rows when memory-mapped)
    generation: int
    mapped: bool = False  # read-only, memory-mapped from disk
    _source: Path | None = field(default=None, repr=False)

    @classmethod
    def build(cls, vectors: np.ndarray, ids: list[str], generation: int,
              exact_limit: int = EXACT_LIMIT, seed: int = 0) -> VectorIndex:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        if len(ids) <= exact_limit:
            index = faiss.IndexFlatIP(dim)
        else:
            nlist = int(min(65536, max(64, IVF_CELLS_PER_SQRT_N * math.sqrt(len(ids)))))
            index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist,
                                                  faiss.ScalarQuantizer.QT_fp16,
                                                  faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = min(len(ids), IVF_TRAIN_PER_CELL * nlist)
            index.train(vectors[np.sort(rng.choice(len(ids), sample, replace=False))])
            index.nprobe = min(IVF_NPROBE, nlist)
        if len(ids):
            index.add(vectors)
        return cls(index, list(ids), generation)

    @property
    def exact(self) -> bool:
        return isinstance(self.index, faiss.IndexFlat)

    @property
    def kind(self) -> str:
        return "exact" if self.exact else "ivf"

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, vectors: np.ndarray, ids: list[str], generation: int) -> None:
        if self.mapped:  # a memory-mapped index is read-only: load it whole to extend it
            self.index = faiss.read_index(str(self._source.with_suffix(".faiss")))
            self.ids = [self._id(i) for i in range(len(self.ids))]
            self.mapped = False
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.ids.extend(ids)
        self.generation = generation

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top-k (atom id, inner product) per query row, best first."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, len(self.ids))
        if k == 0:
            return [[] for _ in queries]
        with _one_thread():
            scores, rows = self.index.search(queries, k)
        return [[(self._id(r), float(s)) for r, s in zip(rr, ss) if r >= 0]
                for rr, ss in zip(rows, scores)]

    def all_ids(self) -> list[str]:
        """Every atom id, in row order: a copy, taken in one step, so another thread may add
        meanwhile (the background checksum pass reads its ids here, not by walking LMDB)."""
        return [_as_str(value) for value in list(self.ids)]

    def _id(self, row: int) -> str:
        return _as_str(self.ids[row])

    def save(self, path: Path) -> None:
        """Write the index files for ``path`` (a stem: ``index/<namespace>``), atomically."""
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        tmp = {s: path.with_name(f"{path.name}{s}.tmp-{os.getpid()}") for s in _SUFFIXES}
        faiss.write_index(self.index, str(tmp[".faiss"]))
        ids = np.array([self._id(i).encode() for i in range(len(self.ids))], dtype=np.bytes_)
        with open(tmp[".ids"], "wb") as f:
            np.save(f, ids if len(ids) else np.zeros(0, dtype="S1"))
        stamp = {"generation": self.generation, "count": len(self.ids), "kind": self.kind}
        tmp[".json"].write_text(json.dumps(stamp))
        for suffix in _SUFFIXES:  # the stamp goes last: a crash in between leaves it stale
            os.chmod(tmp[suffix], FILE_MODE)  # written with the umask's mode (0644)
            with open(tmp[suffix], "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp[suffix], path.with_name(path.name + suffix))
        path.with_name(path.name + ".npz").unlink(missing_ok=True)  # format before v0.2

    @classmethod
    def load(cls, path: Path, mmap: bool = True) -> VectorIndex | None:
        """The cached index for stem ``path`` (memory-mapped unless ``mmap`` is False), or
        None if it is missing, torn or unreadable (then it is rebuilt)."""
        files = {s: path.with_name(path.name + s) for s in _SUFFIXES}
        try:
            stamp = json.loads(files[".json"].read_text())
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
            index = faiss.read_index(str(files[".faiss"]), flags)
            ids = np.load(files[".ids"], mmap_mode="r" if mmap else None)
        except (OSError, ValueError, KeyError, RuntimeError):
            return None
        if not index.ntotal == len(ids) == stamp.get("count"):
            return None
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = min(IVF_NPROBE, index.nlist)
        return cls(index, ids if mmap else [i.decode() for i in ids.tolist()],
                   int(stamp["generation"]), mapped=mmap, _source=path)

    @staticmethod
    def files(path: Path) -> list[Path]:
        """The files of the index with stem ``path`` that exist."""
        return [f for f in (path.with_name(path.name + s) for s in _SUFFIXES) if f.exists()]

    @staticmethod
    def stamp(path: Path) -> dict | None:
        """The stamp of the cached index for stem ``path`` (generation, count, kind), if any:
        enough to tell whether it is fresh without loading it."""
        try:
            return json.loads(path.with_name(path.name + ".json").read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def stored_ids(path: Path, generation: int) -> list[str] | None:
        """The atom ids of the cached index for stem ``path`` if it is of ``generation``, read
        without the index itself (the background checksum pass takes them as a list of what
        to hash, not as the truth: an id gone since is skipped, one missing is read later)."""
        stamp = VectorIndex.stamp(path)
        if stamp is None or stamp.get("generation") != generation:
            return None
        try:
            return [i.decode() for i in np.load(path.with_name(path.name + ".ids")).tolist()]
        except (OSError, ValueError, UnicodeDecodeError):
            return None

    @staticmethod
    def remove(path: Path) -> None:
        for suffix in (*_SUFFIXES, ".npz"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)


@contextmanager
def _one_thread() -> Iterator[None]:
    """FAISS searches on one thread, as the calling thread only: OpenMP's thread count is
    per thread, and faiss-cpu's ``omp_set_num_threads`` is torch's (one runtime), so setting
    it for good would halve torch's throughput. A question's search is too little work for a
    second thread, whose start and wait cost more than it saves (RESULTS.md, "Scale")."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _as_str(value: str | bytes | np.bytes_) -> str:
    """An id as a string (ids loaded from an index file are bytes)."""
    return value.decode() if isinstance(value, (bytes, np.bytes_)) else value
