"""LMDB's errors for a damaged file, in the store's words. A scribbled page (a bad disk block,
a copy cut short) surfaces wherever a read happens to reach it, as ``lmdb.CorruptedError``;
the user should hear which store and what to do, not see LMDB's traceback.

(LMDB checks a page's type where a search from the root lands on it, and answers there with
MDB_CORRUPTED; a cursor stepping onto a damaged sibling page instead fails an assertion
inside LMDB, which ends the process: no Python code can catch that.)"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from microlora.core.errors import StoreError

DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError)


@contextmanager
def damage_explained(path: Path) -> Iterator[None]:
    """Turn LMDB's damage errors raised in the body into a ``StoreError`` saying what to do."""
    try:
        yield
    except DAMAGE as e:
        raise StoreError(f"store {path} is damaged: LMDB found a page it cannot read ({e}). "
                         f"Run `microlora store verify --store {path}` to see what is "
                         "affected, then restore the store from a backup or re-compile it"
                         ) from e
