"""What every formatted reader returns, and how it becomes one ``Document``.

A reader (PDF, HTML, DOCX, PPTX, EPUB) gives the document as a list of parts: headings,
paragraphs and tables, each with its page. ``assemble`` lays them out as one text, a
readable Markdown-like rendering that atom spans point into, and records the structure
chunking needs: headings become sections (the provenance of what follows), not atoms;
paragraphs under one heading form one block, cut into sentences; a table is one block
whose lines are its rows, each with its header ("Year: 2019, Revenue: 4.1 M").
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import zip_longest

from compiler.documents import Block, Document

# a word broken at a line end: a letter, a hyphen, and the next line goes on in lower case
_HYPHENATED = re.compile(r"[^\W\d_]-$")
_LIGATURES = {ord(c): unicodedata.normalize("NFKC", c) for c in "\ufb00\ufb01\ufb02\ufb03"
              "\ufb04\ufb05\ufb06"}


class UnreadableError(Exception):
    """A file that cannot be read; the message is the reason, for the user."""


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 1  # 1: the top level
    page: int = 0  # 0: the format has no pages


@dataclass(frozen=True)
class Paragraph:
    """continues: the same paragraph as the part before it, carried over a page or column
    break (joined to it, not a new paragraph)."""

    text: str
    page: int = 0
    continues: bool = False


@dataclass(frozen=True)
class Table:
    """rows: the cells of each row; the first row is the header."""

    rows: tuple[tuple[str, ...], ...]
    page: int = 0


Part = Heading | Paragraph | Table


def clean(text: str) -> str:
    """One line of plain text: whitespace runs (line breaks, justified spacing) as one space,
    typographic ligatures (ﬁ) as letters, soft hyphens gone."""
    return " ".join(text.translate(_LIGATURES).replace("\u00ad", "").split())


def join_lines(lines: Iterable[str]) -> str:
    """Lines of one paragraph as one text; a word hyphenated at a line end is joined
    ("infor-" + "mation" -> "information")."""
    out = ""
    for line in lines:
        out = _join(out, clean(line))
    return out


def _join(left: str, right: str) -> str:
    if not left or not right:
        return left or right
    if _HYPHENATED.search(left) and right[0].islower():
        return left[:-1] + right
    return f"{left} {right}"


def table_lines(rows: Sequence[Sequence[str | None]]) -> list[str]:
    """One line per row, each cell after its column's header; a lone row (no header) is its
    cells. Empty rows and repeats of the header (a table carried over a page) are dropped."""
    cells = [[clean(c or "") for c in row] for row in rows]
    cells = [row for row in cells if any(row)]
    if not cells:
        return []
    header, body = cells[0], cells[1:]
    if not body:
        return [", ".join(c for c in header if c)]
    return [", ".join(f"{h}: {c}" if h else c for h, c in zip_longest(header, row, fillvalue="")
                      if c)
            for row in body if row != header]


def assemble(source: str, parts: Iterable[Part], title: str = "") -> Document:
    """The parts as one Document: text, blocks, sections and pages (``Document``)."""
    w = _Writer()
    for part in parts:
        if isinstance(part, Heading):
            w.heading(clean(part.text), part.level, part.page)
        elif isinstance(part, Paragraph):
            w.paragraph(clean(part.text), part.page, part.continues)
        else:
            w.table(table_lines(part.rows), part.page)
    w.close_prose()
    return Document(source, "".join(w.chunks), clean(title), tuple(w.blocks),
                    tuple(w.sections), tuple(w.pages))


class _Writer:
    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.size = 0
        self.blocks: list[Block] = []
        self.sections: list[tuple[int, tuple[str, ...]]] = []
        self.pages: list[tuple[int, int]] = []
        self.path: list[tuple[int, str]] = []  # (level, heading) from the top down
        self.prose: int | None = None  # start of the open text block

    def put(self, text: str, page: int, separator: str) -> int:
        if self.size:
            self.chunks.append(separator)
            self.size += len(separator)
        start = self.size
        if page and (not self.pages or page > self.pages[-1][1]):
            self.pages.append((start, page))
        self.chunks.append(text)
        self.size += len(text)
        return start

    def close_prose(self) -> None:
        if self.prose is not None:
            self.blocks.append(Block(self.prose, self.size, "text"))
            self.prose = None

    def heading(self, text: str, level: int, page: int) -> None:
        if not text:
            return
        self.close_prose()
        start = self.put(text, page, "\n\n")
        while self.path and self.path[-1][0] >= level:
            self.path.pop()
        self.path.append((level, text))
        self.sections.append((start, tuple(h for _, h in self.path)))

    def paragraph(self, text: str, page: int, continues: bool) -> None:
        if not text:
            return
        if continues and self.prose is not None:  # the last chunk is that paragraph
            last = self.chunks.pop()
            joined = _join(last, text)
            self.chunks.append(joined)
            self.size += len(joined) - len(last)
            if page and (not self.pages or page > self.pages[-1][1]):
                self.pages.append((self.size - len(text), page))  # where it goes on
            return
        start = self.put(text, page, "\n\n")
        if self.prose is None:
            self.prose = start

    def table(self, lines: list[str], page: int) -> None:
        if not lines:
            return
        self.close_prose()
        start = self.put("\n".join(lines), page, "\n\n")
        self.blocks.append(Block(start, self.size, "table"))
