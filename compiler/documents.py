"""Reading a corpus: files and directories of .txt, .md and .jsonl into documents.

Anything that cannot be read is reported by name with a reason the user can act on, and the
rest still compiles: a bad file never stops a corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SUPPORTED = (".txt", ".md", ".jsonl")
MAX_FILE_MB = 16.0


@dataclass(frozen=True)
class Document:
    """source: where it came from (a path, or ``path#id`` / ``path:line`` for a JSONL row)."""

    source: str
    text: str
    title: str = ""


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str


def read_documents(paths: Iterable[str | Path], max_file_mb: float = MAX_FILE_MB
                   ) -> tuple[list[Document], list[Skipped]]:
    """Every readable document under ``paths`` (files, or directories searched recursively),
    and every problem found on the way."""
    docs: list[Document] = []
    skipped: list[Skipped] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED)
            if not files:
                skipped.append(Skipped(str(path), f"no {', '.join(SUPPORTED)} files in this "
                                                  "directory"))
        elif path.is_file():
            files = [path]
        else:
            skipped.append(Skipped(str(path), "no such file or directory"))
            continue
        for file in files:
            _read_file(file, max_file_mb, docs, skipped)
    return docs, skipped


def _read_file(path: Path, max_file_mb: float, docs: list[Document],
               skipped: list[Skipped]) -> None:
    def skip(reason: str) -> None:
        skipped.append(Skipped(str(path), reason))

    if path.suffix not in SUPPORTED:
        return skip(f"unsupported file type {path.suffix or '(none)'}; use "
                    f"{', '.join(SUPPORTED)}")
    size = path.stat().st_size
    if size > max_file_mb * 2**20:
        return skip(f"{size / 2**20:.1f} MB is over the {max_file_mb:g} MB limit per file; "
                    "split it, or raise --max-file-mb")
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        return skip("binary file (it contains NUL bytes); give text files")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return skip(f"not UTF-8 (invalid byte at offset {e.start}); convert it to UTF-8")
    if not text.strip():
        return skip("empty file")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text, docs, skipped)
    title = ""
    if path.suffix == ".md":
        title = next((line.lstrip("#").strip() for line in text.splitlines()
                      if line.startswith("# ")), "")
    docs.append(Document(str(path), text.lstrip("\ufeff"), title))


def _read_jsonl(path: Path, text: str, docs: list[Document], skipped: list[Skipped]) -> None:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except ValueError as e:
            skipped.append(Skipped(where, f"not valid JSON ({e.msg})"))
            continue
        body = row.get("text") if isinstance(row, dict) else None
        if not isinstance(body, str) or not body.strip():
            skipped.append(Skipped(where, 'needs a non-empty "text" field'))
            continue
        source = f"{path}#{row['id']}" if row.get("id") not in (None, "") else where
        docs.append(Document(source, body, str(row.get("title") or "")))
