"""API keys for ``microlora serve``: each key maps to one user's namespace plus read access to
the shared corpora it is granted, and carries that user's quota.

Keys live in ``<store>/keys.json`` (mode 0600), stored as SHA-256 hashes: a key is 32 random
bytes, so a fast hash is enough (slow password hashes exist for guessable secrets). The
plaintext is shown once, by ``microlora keys add``. A change reads, changes and writes the
file back under a lock (``keys.json.lock``), replacing it atomically; the server re-reads it
when it changes, so keys added or revoked apply without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from composer.retrieval import USER_PREFIX
from microlora.core.errors import MicroloraError
from store.layout import FILE_MODE, StoreLayout

ALL_SHARED = "*"  # a grant of every shared namespace, present and future
_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")  # fullmatch: "$" allows a "\n"
_KEY_RE = re.compile(r"mlk-([0-9a-f]{8})-[A-Za-z0-9_-]{20,}")
# A file changed again within its mtime's clock tick keeps its mtime (and, being replaced,
# maybe even its inode, reused): until this long after its mtime, its content is compared.
_RACY_NS = 2_000_000_000  # the coarsest common timestamp (FAT's 2 s)


@dataclass(frozen=True)
class KeyRecord:
    """One API key, without its secret."""

    id: str  # the key's public part, shown by `keys ls` and used by `keys revoke`
    user: str
    grants: tuple[str, ...] = (ALL_SHARED,)
    max_atoms: int | None = None
    max_bytes: int | None = None
    created: float = field(default_factory=time.time)
    sha256: str = ""

    @property
    def namespace(self) -> str:
        """The user's personal namespace: the only one this key can write or delete."""
        return USER_PREFIX + self.user

    def can_read(self, namespace: str, shared: list[str]) -> bool:
        """Own namespace, or a shared corpus this key was granted (never another user's)."""
        if namespace == self.namespace:
            return True
        if namespace.startswith(USER_PREFIX):
            return False
        return ALL_SHARED in self.grants and namespace in shared or namespace in self.grants

    def readable_shared(self, shared: list[str]) -> list[str]:
        return [ns for ns in shared if self.can_read(ns, shared)]


class KeyStore:
    """The keys of one store directory (``<store>/keys.json``: ``store.layout``)."""

    def __init__(self, store_dir: str | Path):
        layout = StoreLayout(Path(store_dir))
        self.path = layout.keys_file
        self._lock = FileLock(layout.keys_lock_file, timeout=30, mode=FILE_MODE)
        self._records: dict[str, KeyRecord] = {}
        self._stat: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) last read
        self._digest = b""  # of the content last read

    def add(self, user: str, grants: tuple[str, ...] = (ALL_SHARED,), *,
            max_atoms: int | None = None, max_bytes: int | None = None,
            shared: Sequence[str] | None = None) -> tuple[str, KeyRecord]:
        """Create a key for ``user``; returns (the plaintext key, shown once, and its record).

        shared: the store's shared namespaces; given, a grant of any other name is refused
        (a typo would otherwise grant nothing, silently)."""
        if not _USER_RE.fullmatch(user or ""):
            raise MicroloraError(f"invalid user name {user!r}: use 1-64 letters, digits and "
                                 "'._@-', starting with a letter or digit")
        for ns in grants:
            if ns.startswith(USER_PREFIX):
                raise MicroloraError(f"cannot grant {ns!r}: a key reads only its own user "
                                     "namespace and shared corpora")
            if shared is not None and ns != ALL_SHARED and ns not in shared:
                have = (f"its shared namespaces are {', '.join(shared)}" if shared
                        else "it has no shared namespace yet")
                raise MicroloraError(f"cannot grant {ns!r}: {ns!r} is not a namespace of this "
                                     f"store; {have} (or grant {ALL_SHARED!r}, every shared "
                                     "namespace, present and future)")
        if any(v is not None and v < 1 for v in (max_atoms, max_bytes)):
            raise MicroloraError("quotas must be positive")
        with self._changing():
            records = self._load(force=True)
            key_id = secrets.token_hex(4)
            while key_id in records:
                key_id = secrets.token_hex(4)
            plaintext = f"mlk-{key_id}-{secrets.token_urlsafe(32)}"
            record = KeyRecord(key_id, user, tuple(grants) or (ALL_SHARED,), max_atoms,
                               max_bytes, sha256=_hash(plaintext))
            self._save({**records, key_id: record})
        return plaintext, record

    def revoke(self, key_id: str) -> KeyRecord:
        with self._changing():
            records = dict(self._load(force=True))
            if key_id not in records:
                raise MicroloraError(f"no key with id {key_id!r}; `microlora keys ls` lists "
                                     "them")
            record = records.pop(key_id)
            self._save(records)
        return record

    def list(self) -> list[KeyRecord]:
        return sorted(self._load(force=True).values(), key=lambda r: (r.user, r.created))

    def authenticate(self, plaintext: str | None) -> KeyRecord | None:
        """The record of a valid key, else None (constant-time comparison of the hash)."""
        m = _KEY_RE.fullmatch(plaintext or "")
        if not m:
            return None
        record = self._load().get(m.group(1))
        if record is None or not hmac.compare_digest(record.sha256, _hash(plaintext)):
            return None
        return record

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Held while keys.json is read, changed and written back, so that a concurrent add
        cannot undo a revoke (or drop another add)."""
        try:
            with self._lock:
                yield
        except Timeout:
            raise MicroloraError(f"{self.path} is being changed by another process (its lock "
                                 f"{self._lock.lock_file} was held for {self._lock.timeout:g} "
                                 "s); try again") from None

    def _load(self, force: bool = False) -> dict[str, KeyRecord]:
        """The keys, re-read when the file changed (a stat per call; the content is read only
        while the stat alone could miss a change)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._records, self._stat, self._digest = {}, None, b""
            return self._records
        stat = (st.st_mtime_ns, st.st_size, st.st_ino)
        racy = time.time_ns() - st.st_mtime_ns < _RACY_NS
        if not (force or racy or stat != self._stat):
            return self._records
        body = self.path.read_bytes()
        digest = hashlib.sha256(body).digest()
        if force or digest != self._digest:
            try:
                raw = json.loads(body)
                self._records = {r["id"]: KeyRecord(**{**r, "grants": tuple(r["grants"])})
                                 for r in raw["keys"]}
            except (ValueError, KeyError, TypeError) as e:
                raise MicroloraError(f"{self.path} is corrupt ({e}); restore it or delete it "
                                     "and add the keys again") from e
        self._stat, self._digest = stat, digest
        return self._records

    def _save(self, records: dict[str, KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        body = json.dumps({"version": 1, "keys": [asdict(r) for r in records.values()]},
                          indent=1)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._records, self._stat, self._digest = dict(records), None, b""


def _hash(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()
