"""The FAISS index of one namespace: atom embeddings -> atom ids.

LMDB is the source of truth; an index file is a cache stamped with the namespace generation it
was built from, rebuilt whenever the generations disagree. Below ``exact_limit`` atoms the
index is exact (flat inner product, i.e. cosine on unit vectors); above it, HNSW.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

EXACT_LIMIT = 50_000
HNSW_M = 32  # graph degree: recall vs memory
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128  # search breadth: recall vs latency


@dataclass
class VectorIndex:
    index: faiss.Index
    ids: list[str]
    generation: int

    @classmethod
    def build(cls, vectors: np.ndarray, ids: list[str], generation: int,
              exact_limit: int = EXACT_LIMIT) -> VectorIndex:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        if len(ids) <= exact_limit:
            index = faiss.IndexFlatIP(dim)
        else:
            index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = HNSW_EF_SEARCH
        if len(ids):
            index.add(vectors)
        return cls(index, list(ids), generation)

    @property
    def exact(self) -> bool:
        return isinstance(self.index, faiss.IndexFlat)

    def add(self, vectors: np.ndarray, ids: list[str], generation: int) -> None:
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.ids.extend(ids)
        self.generation = generation

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top-k (atom id, inner product) per query row, best first."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, len(self.ids))
        if k == 0:
            return [[] for _ in queries]
        scores, rows = self.index.search(queries, k)
        return [[(self.ids[r], float(s)) for r, s in zip(rr, ss) if r >= 0]
                for rr, ss in zip(rows, scores)]

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename): a crash never leaves half an index."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, index=faiss.serialize_index(self.index),
                     ids=np.array(self.ids, dtype=str), generation=np.int64(self.generation))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> VectorIndex | None:
        """The cached index, or None if it is missing or unreadable (then it is rebuilt)."""
        try:
            with np.load(io.BytesIO(path.read_bytes())) as z:
                return cls(faiss.deserialize_index(z["index"]), z["ids"].tolist(),
                           int(z["generation"]))
        except (OSError, ValueError, KeyError, RuntimeError):
            return None
