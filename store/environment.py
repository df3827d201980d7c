"""Opening a store's LMDB environment: room for its namespaces, and locks where they work."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb

from store.layout import FILE_MODE


def open_environment(path: Path, *, map_size: int, max_namespaces: int,
                     readonly: bool) -> tuple[lmdb.Environment, int]:
    """LMDB's environment at ``path`` and the namespace limit it was opened with: room for
    ``max_namespaces`` (LMDB reserves a slot per database in every transaction: a read costs
    ~1 us per thousand), and never less than the store already has, deleted namespaces
    included, so a store made under a larger limit still opens and only new namespaces are
    refused. Read-ahead stays on (LMDB's default): an atom is ~200 KB of contiguous overflow
    pages, and without it a cold atom faulted in 4 KB at a time (2.4x slower than reading a
    file; benchmarks/RESULTS.md)."""
    def open_env(limit: int) -> lmdb.Environment:
        return lmdb.open(str(path), map_size=map_size, max_dbs=limit + 1, readonly=readonly,
                         create=False, readahead=True, mode=FILE_MODE,
                         lock=not readonly or _lock_is_writable(path))

    env = open_env(max_namespaces)
    held = env.stat()["entries"] - 1  # the main database lists every named one
    if held > max_namespaces:
        env.close()
        env = open_env(held)
    return env, max(max_namespaces, held)


def _lock_is_writable(path: Path) -> bool:
    """Read-only opens still take LMDB's reader lock when they can, so a concurrent writer
    cannot reuse pages under them; on a read-only filesystem they go without."""
    lock = path / "lock.mdb"
    return os.access(lock if lock.exists() else path, os.W_OK)
