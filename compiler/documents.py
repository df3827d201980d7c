"""Reading a corpus: files and directories of text (.txt, .md, .jsonl) and of formatted
documents (.pdf, .html, .docx, .pptx, .epub; ``compiler.readers``) into documents.

Anything that cannot be read is reported by name with a reason the user can act on, and the
rest still compiles: a bad file never stops a corpus.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TEXT_TYPES = (".txt", ".md", ".jsonl")
FORMATTED_TYPES = (".pdf", ".html", ".htm", ".docx", ".pptx", ".epub")  # the docs extra
SUPPORTED = TEXT_TYPES + FORMATTED_TYPES
MAX_FILE_MB = 16.0


@dataclass(frozen=True)
class Block:
    """A stretch ``text[start:end]`` of a formatted document, cut into atoms on its own:
    "text" (paragraphs, cut into sentences) or "table" (one atom per line: a row with its
    header). Headings lie between blocks: they are sections, not atoms."""

    start: int
    end: int
    kind: str = "text"


@dataclass(frozen=True)
class Document:
    """source: where it came from, which is also its document id in the store: a file's path
    relative to the directory compiled (its name, for a file given on its own), with ``#id``
    (or ``:line``) for a JSONL row; an upload's id.

    blocks: the stretches to cut into atoms; () for plain text, which is cut whole.
    sections: (offset, heading path) marks: the headings in force from each offset on.
    pages: (offset, page) marks: the page (PDF) or slide (PPTX) from each offset on.
    """

    source: str
    text: str
    title: str = ""
    blocks: tuple[Block, ...] = ()
    sections: tuple[tuple[int, tuple[str, ...]], ...] = ()
    pages: tuple[tuple[int, int], ...] = ()

    def place(self, offset: int) -> tuple[int, tuple[str, ...]]:
        """(page, heading path) at ``offset`` of the text: (0, ()) where there are none."""
        return _mark(self.pages, offset, 0), _mark(self.sections, offset, ())

    def to_json(self) -> dict:
        """Everything it holds, as JSON values (a server persists its queued jobs' documents:
        ``microlora.server.jobs``); ``from_json`` gives it back equal."""
        return {"source": self.source, "text": self.text, "title": self.title,
                "blocks": [[b.start, b.end, b.kind] for b in self.blocks],
                "sections": [[at, list(path)] for at, path in self.sections],
                "pages": [[at, page] for at, page in self.pages]}

    @classmethod
    def from_json(cls, d: dict) -> Document:
        return cls(d["source"], d["text"], d["title"],
                   tuple(Block(*b) for b in d["blocks"]),
                   tuple((at, tuple(path)) for at, path in d["sections"]),
                   tuple((at, page) for at, page in d["pages"]))


def _mark(marks, offset, default):
    i = bisect.bisect_right([m[0] for m in marks], offset) - 1
    return marks[i][1] if i >= 0 else default


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str


def read_documents(paths: Iterable[str | Path], max_file_mb: float = MAX_FILE_MB
                   ) -> tuple[list[Document], list[Skipped]]:
    """Every readable document under ``paths`` (files, or directories searched recursively),
    and every problem found on the way (naming each path as it was given).

    A document's source is its path relative to the directory given (a file given on its own:
    its name), so one corpus compiled by a relative and by an absolute path, or from another
    working directory, has the same documents in the store."""
    docs: list[Document] = []
    skipped: list[Skipped] = []
    seen: dict[str, Path] = {}  # document source -> the file that has it
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            root = path
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in SUPPORTED)
            if not files:
                skipped.append(Skipped(str(path), f"no {', '.join(SUPPORTED)} files in this "
                                                  "directory"))
        elif path.is_file():
            root, files = path.parent, [path]
        else:
            skipped.append(Skipped(str(path), "no such file or directory"))
            continue
        for file in files:
            source, real = file.relative_to(root).as_posix(), file.resolve()
            if source in seen:  # the same file again is read once
                if seen[source] != real:
                    skipped.append(Skipped(str(file), f"its document id {source!r} is already "
                                                      f"that of {seen[source]}; compile the "
                                                      "directory that holds both instead"))
                continue
            seen[source] = real
            got, problems = _read_file(file, source, max_file_mb)
            docs += got
            skipped += problems
    return docs, skipped


def _read_file(path: Path, source: str, max_file_mb: float
               ) -> tuple[list[Document], list[Skipped]]:
    size = path.stat().st_size
    if path.suffix.lower() in SUPPORTED and size > max_file_mb * 2**20:
        return [], [Skipped(str(path), f"{size / 2**20:.1f} MB is over the {max_file_mb:g} MB "
                                       "limit per file; split it, or raise --max-file-mb")]
    docs, problems = read_file_bytes(source, b"" if path.suffix.lower() not in SUPPORTED
                                     else path.read_bytes())
    # a problem names the path as given (the user's to find), with any ":line" it has
    return docs, [Skipped(str(path) + p.source[len(source):], p.reason) for p in problems]


def read_file_bytes(source: str, data: bytes) -> tuple[list[Document], list[Skipped]]:
    """The documents in one file's bytes, by its name's type (a file from disk, or uploaded
    to the server); its problems name ``source``."""
    suffix = Path(source).suffix.lower()
    if suffix not in SUPPORTED:
        return [], [Skipped(source, f"unsupported file type {suffix or '(none)'}; use "
                                    f"{', '.join(SUPPORTED)}")]
    if suffix in FORMATTED_TYPES:
        from compiler.readers import UnreadableError, read_formatted

        try:
            return [read_formatted(source, suffix, data)], []
        except UnreadableError as e:
            return [], [Skipped(source, str(e))]
    if b"\x00" in data[:8192]:
        return [], [Skipped(source, "binary file (it contains NUL bytes); give text files")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], [Skipped(source, f"not UTF-8 (invalid byte at offset {e.start}); convert "
                                    "it to UTF-8")]
    text = text.removeprefix("\ufeff")  # a BOM is no text, in every text format
    if not text.strip():
        return [], [Skipped(source, "empty file")]
    if suffix == ".jsonl":
        return _read_jsonl(source, text)
    if suffix == ".md":
        from compiler.readers.markdown import markdown_lines, markdown_sections

        title = next((line.lstrip("#").strip() for line in markdown_lines(text)
                      if line.startswith("# ")), "")
        return [Document(source, text, title, sections=markdown_sections(text))], []
    return [Document(source, text)], []


def _read_jsonl(source: str, text: str) -> tuple[list[Document], list[Skipped]]:
    docs: list[Document] = []
    skipped: list[Skipped] = []
    # rows end at \n (or \r\n) only: str.splitlines() would also break inside a JSON string
    # at U+2028, U+2029 or U+0085, which are legal there unescaped
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            row = json.loads(line)
        except ValueError as e:
            skipped.append(Skipped(where, f"not valid JSON ({e.msg})"))
            continue
        body = row.get("text") if isinstance(row, dict) else None
        if not isinstance(body, str) or not body.strip():
            skipped.append(Skipped(where, 'needs a non-empty "text" field'))
            continue
        source_id = f"{source}#{row['id']}" if row.get("id") not in (None, "") else where
        docs.append(Document(source_id, body, str(row.get("title") or "")))
    return docs, skipped
