"""Where microlora keeps its cache: ``$MICROLORA_HOME``, default ``~/.cache/microlora``."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "MICROLORA_HOME"


def microlora_home() -> Path:
    """The cache directory (converted base models, default stores). Read from the environment
    on every call so tests and the CLI's ``--home`` can point it elsewhere."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "microlora").expanduser()


def dir_bytes(path: Path) -> int:
    """Bytes of all files under ``path`` (what a model folder or a store costs on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
