"""What a store directory holds. Only ``store/`` builds paths inside it::

    data.mdb, lock.mdb        LMDB: the source of truth (atoms, namespaces, manifests)
    index/<namespace>.*       FAISS index per namespace: a cache, rebuilt from LMDB
    reader/                   the store's reader adapter, if one was installed (PEFT folder)
    keys.json                 the server's API keys (hashed), mode 0600
    keys.json.lock            held while keys.json is read, changed and written back
    shards/rank-<r>/          per-process stores of a distributed compile, merged by rank 0

The directory is created 0700; LMDB's files, the index files and keys.json 0600 (``DIR_MODE``,
``FILE_MODE``): they hold every tenant's text and the keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

DATA_FILE = "data.mdb"
# A store holds every tenant's text (LMDB and the indexes) and the API keys: its owner's only.
DIR_MODE = 0o700
FILE_MODE = 0o600


@dataclass(frozen=True)
class StoreLayout:
    """The paths inside the store directory ``root`` (which need not exist yet)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def data_file(self) -> Path:
        return self.root / DATA_FILE

    @property
    def lock_file(self) -> Path:
        return self.root / "lock.mdb"

    def index(self, namespace: str) -> Path:
        """The stem of a namespace's index files (namespace names may hold ':' and '@')."""
        return self.root / "index" / quote(namespace, safe="")

    @property
    def reader_dir(self) -> Path:
        return self.root / "reader"

    @property
    def keys_file(self) -> Path:
        return self.root / "keys.json"

    @property
    def keys_lock_file(self) -> Path:
        return self.root / "keys.json.lock"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def shard(self, rank: int) -> Path:
        return self.shards_dir / f"rank-{rank}"

    def shards(self) -> list[Path]:
        """The shard folders a distributed compile left, in rank order."""
        return sorted(self.shards_dir.glob("rank-*")) if self.shards_dir.is_dir() else []


def is_store(path: str | Path) -> bool:
    """Whether ``path`` holds a store (it may still be unreadable or of another version)."""
    return StoreLayout(Path(path)).data_file.is_file()
