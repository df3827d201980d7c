"""PDF pages into headings, paragraphs and tables, each with its page.

pdfplumber, on pdfminer.six, does the reading: pdfminer's layout analysis gives the text
boxes (paragraphs) in reading order with each character's font size, and pdfplumber finds
ruled tables and their cells. What a PDF does not say is inferred, simply:

- running headers and footers: a line among the first or last two of a page whose text,
  numbers aside, comes back there on three pages (or on every page of a shorter document)
  is dropped, and so is a lone page number there ("3", "Page 3 of 12", "- 3 -", "iv");
  chapter headers thus go unless a chapter has fewer than three pages;
- headings: lines set larger than the body text (the most common size), a level per size;
- a paragraph cut by a page or column break (its last line ends no sentence) goes on in the
  next text box, and a word hyphenated at a line end is joined (``structure.join_lines``).
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass

import pdfplumber
from pdfminer.layout import LTChar, LTTextBox
from pdfminer.pdfdocument import PDFPasswordIncorrect
from pdfplumber.utils.exceptions import PdfminerException

from compiler.readers.structure import (
    Heading,
    Paragraph,
    Part,
    Table,
    UnreadableError,
    clean,
    join_lines,
)

EDGE_LINES = 2  # lines at the top and at the bottom of a page where headers and footers are
RUNNING_PAGES = 3  # an edge line seen on this many pages (or on every page) is running
HEADING_RATIO = 1.15  # a line this much larger than the body text is a heading
MAX_HEADING_CHARS = 200
_SENTENCE_END = re.compile(r"""[.!?…:;]["'”’)\]]*$""")
_PAGE_NUMBER = re.compile(r"(?:page|p\.)?\s*#(?:\s*(?:of|/)\s*#)?|[-–— ]*#[-–— ]*"
                          r"|(?=[ivxlcdm])m{0,3}(?:cm|cd|d?c{0,3})(?:xc|xl|l?x{0,3})"
                          r"(?:ix|iv|v?i{0,3})")  # 3, Page 3 of 12, - 3 -, iv


@dataclass(frozen=True)
class _Line:
    text: str
    size: float  # its most common font size, to half a point
    top: float


@dataclass
class _Page:
    number: int
    items: list[list[_Line] | Table]  # reading order: text boxes (their lines) and tables


def read(data: bytes, suffix: str = ".pdf") -> tuple[list[Part], str]:
    """The PDF's parts and its title (from its metadata; "" if it has none)."""
    try:
        with pdfplumber.open(io.BytesIO(data), laparams={}) as pdf:
            pages = [_read_page(page) for page in pdf.pages]
            title = (pdf.metadata or {}).get("Title")
    except Exception as e:  # noqa: BLE001 - pdfminer raises many kinds; each is reported
        raise UnreadableError(_why(e)) from None
    return _parts(pages), title if isinstance(title, str) else ""


def _why(e: Exception) -> str:
    cause = e.args[0] if isinstance(e, PdfminerException) and e.args else e
    if isinstance(cause, PDFPasswordIncorrect):
        return ("encrypted: it needs a password to open; save a copy without one (e.g. "
                "qpdf --decrypt) and compile that")
    detail = str(cause).strip() or type(cause).__name__
    return f"not a readable PDF ({detail[:200]})"


def _read_page(page) -> _Page:
    # a ruled grid of two rows and two columns at least: not a frame or a boxed paragraph
    tables = [t for t in page.find_tables() if len(t.rows) >= 2 and len(t.columns) >= 2]
    boxes = [t.bbox for t in tables]  # (x0, top, x1, bottom), pdfplumber's coordinates
    items: list[list[_Line] | Table] = []
    for box in page.layout:
        if not isinstance(box, LTTextBox):
            continue
        lines = []
        for line in box:
            chars = [c for c in line if isinstance(c, LTChar)]
            text = clean(line.get_text())
            x, top = (line.x0 + line.x1) / 2, page.height - line.y1
            middle = top + (line.y1 - line.y0) / 2
            if not chars or not text or any(x0 <= x <= x1 and t <= middle <= b
                                            for x0, t, x1, b in boxes):
                continue  # nothing, or a table's cell (read with its table)
            size = Counter(round(c.size * 2) / 2 for c in chars).most_common(1)[0][0]
            lines.append(_Line(text, size, top))
        if lines:
            items.append(lines)
    for table, (_, top, _, _) in zip(tables, boxes):
        rows = Table(tuple(tuple(c or "" for c in row) for row in table.extract()),
                     page.page_number)
        at = next((i for i, item in enumerate(items)
                   if isinstance(item, list) and item[0].top >= top), len(items))
        items.insert(at, rows)
    return _Page(page.page_number, items)


def _parts(pages: list[_Page]) -> list[Part]:
    running = _running_lines(pages)
    kept = [[line for line in item if id(line) not in running] if isinstance(item, list)
             else item for page in pages for item in page.items]
    sizes: Counter[float] = Counter()
    for item in kept:
        if isinstance(item, list):
            for line in item:
                sizes[line.size] += len(line.text)
    body = sizes.most_common(1)[0][0] if sizes else 0.0
    levels = {size: level for level, size in enumerate(
        sorted((s for s in sizes if s >= body * HEADING_RATIO), reverse=True), start=1)}
    parts: list[Part] = []
    numbers = [page.number for page in pages for _ in page.items]
    for page, item in zip(numbers, kept):
        if isinstance(item, Table):
            parts.append(item)
            continue
        for level, lines in _runs(item, levels):
            if level:
                parts.append(Heading(" ".join(line.text for line in lines), level, page))
                continue
            text = join_lines(line.text for line in lines)
            last = parts[-1] if parts else None
            goes_on = isinstance(last, Paragraph) and not _SENTENCE_END.search(last.text)
            parts.append(Paragraph(text, page, continues=goes_on))
    return parts


def _runs(lines: list[_Line], levels: dict[float, int]) -> list[tuple[int, list[_Line]]]:
    """A text box's lines in runs of one kind: (heading level, or 0 for body text, lines)."""
    out: list[tuple[int, list[_Line]]] = []
    for line in lines:
        level = levels.get(line.size, 0) if len(line.text) <= MAX_HEADING_CHARS and any(
            c.isalpha() for c in line.text) else 0
        if out and out[-1][0] == level:
            out[-1][1].append(line)
        else:
            out.append((level, [line]))
    return out


def _running_lines(pages: list[_Page]) -> set[int]:
    """The ids of the lines that are running headers, footers or page numbers."""
    edges = []
    for page in pages:
        lines = sorted((line for item in page.items if isinstance(item, list) for line in item),
                       key=lambda line: line.top)
        edge = lines[:EDGE_LINES] + lines[EDGE_LINES:][-EDGE_LINES:]
        edges.append([(line, _shape(line.text)) for line in edge])
    seen = Counter(shape for edge in edges for shape in {s for _, s in edge})
    repeated = {s for s, n in seen.items() if n >= max(2, min(RUNNING_PAGES, len(pages)))}
    return {id(line) for edge in edges for line, shape in edge
            if shape in repeated or _PAGE_NUMBER.fullmatch(shape)}


def _shape(text: str) -> str:
    """A line's text with its numbers as #: "Page 3 of 12" and "Page 4 of 12" alike."""
    return re.sub(r"\d+", "#", text.lower())
