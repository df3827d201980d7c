"""Question -> atoms: search each namespace's FAISS index, merge, keep the top k.

A user's personal namespace is layered over shared corpora simply by searching both and
merging by score; a namespace that is not asked for is never searched, so one user's query
cannot reach another user's atoms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from microlora.core.errors import MicroloraError, TooFewAtomsError
from store import AdapterStore

USER_PREFIX = "user:"


@dataclass(frozen=True)
class Hit:
    """One retrieved atom; ``weight`` multiplies its delta when it is composed."""

    namespace: str
    id: str
    score: float
    weight: float = 1.0


def default_namespaces(store: AdapterStore) -> list[str]:
    """Every shared corpus of the store; personal (``user:``) namespaces only when named."""
    return [ns for ns in store.namespaces() if not ns.startswith(USER_PREFIX)]


def retrieve(store: AdapterStore, queries: np.ndarray, namespaces: Sequence[str], k: int,
             *, min_score: float | None = None, weighting: str = "uniform"
             ) -> list[list[Hit]]:
    """The k best atoms over ``namespaces`` for each query vector, best first.

    ``min_score`` drops weaker hits (so a request may get fewer than k, or none: then the
    composer says it found nothing relevant). ``weighting``: "uniform" composes every hit at
    weight 1, the way atoms were trained beside each other; "score" weights hits by their
    cosine, normalised to mean 1.
    """
    if k < 1:
        raise MicroloraError(f"k must be at least 1, got {k}")
    if not namespaces:
        raise MicroloraError(f"store {store.path} has no shared namespaces to search; compile "
                             "documents into it first (microlora compile DOCS --store ...), or "
                             "name a namespace with --namespace")
    total = sum(store.count(ns) for ns in namespaces)  # unknown namespaces raise here
    if total == 0:
        raise TooFewAtomsError(f"namespaces {', '.join(namespaces)} of store {store.path} hold "
                               "no atoms; compile documents into them first", k=k, total=0)
    if k > total:
        raise TooFewAtomsError(f"k={k} but namespaces {', '.join(namespaces)} hold only "
                               f"{total} atoms; ask with -k {total} or less", k=k, total=total)
    merged: list[list[Hit]] = [[] for _ in range(len(queries))]
    for ns in namespaces:
        for row, found in zip(merged, store.search(ns, queries, k)):
            row += [Hit(ns, atom_id, score) for atom_id, score in found]
    return [select(row, k, min_score, weighting) for row in merged]


def select(hits: Sequence[Hit], k: int, min_score: float | None = None,
           weighting: str = "uniform") -> list[Hit]:
    """The k best hits, those under ``min_score`` dropped, weighted (see ``weigh``)."""
    row = sorted(hits, key=lambda h: -h.score)[:k]
    if min_score is not None:
        row = [h for h in row if h.score >= min_score]
    return weigh(row, weighting)


def weigh(hits: Sequence[Hit], weighting: str) -> list[Hit]:
    """The hits with weights set: all 1 ("uniform"), cosine normalised to mean 1 ("score"), or
    all 1/k ("mean": the atoms' mean delta, not their sum, so k atoms move the model as far as
    one does)."""
    hits = list(hits)
    if weighting == "uniform" or not hits:
        return hits
    if weighting == "mean":
        return [Hit(h.namespace, h.id, h.score, 1.0 / len(hits)) for h in hits]
    scores = np.array([max(h.score, 0.0) for h in hits])
    mean = scores.mean()
    weights = scores / mean if mean > 0 else np.ones_like(scores)
    return [Hit(h.namespace, h.id, h.score, float(w)) for h, w in zip(hits, weights)]
