"""Word (.docx) and PowerPoint (.pptx) files into headings, paragraphs and tables.

python-docx gives a document's body in order, each paragraph with its style: "Heading N" is
a heading of level N (a style based on one counts too), "Title" is the document's title;
headers, footers and comments are not the body and are left out. python-pptx gives each
slide's shapes: the title placeholder is the slide's heading, the others are read top to
bottom, and the slide's number is its page ("deck.pptx slide 3").
"""

from __future__ import annotations

import io
import re

import docx
from docx.table import Table as DocxTable
from pptx import Presentation
from pptx.enum.shapes import MSO_SHAPE_TYPE

from compiler.readers.structure import Heading, Paragraph, Part, Table, UnreadableError

_HEADING_STYLE = re.compile(r"Heading (\d)")


def read(data: bytes, suffix: str) -> tuple[list[Part], str]:
    return (_docx if suffix == ".docx" else _pptx)(data)


def _docx(data: bytes) -> tuple[list[Part], str]:
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - a damaged zip or XML raises many kinds
        raise UnreadableError(f"not a readable DOCX file ({type(e).__name__}: {e}); is it "
                              "truncated or damaged? open and save it again in Word") from None
    title = document.core_properties.title or ""
    parts: list[Part] = []
    for block in document.iter_inner_content():
        if isinstance(block, DocxTable):
            parts.append(Table(_rows(block)))
            continue
        level = _level(block.style)
        if level == 0:
            title = title or block.text
        elif level:
            parts.append(Heading(block.text, level))
        else:
            parts.append(Paragraph(block.text))
    return parts, title


def _level(style) -> int | None:
    """A paragraph style's heading level: 0 for the title, None for body text."""
    while style is not None:
        if style.name == "Title":
            return 0
        if m := _HEADING_STYLE.fullmatch(style.name or ""):
            return int(m.group(1))
        style = style.base_style
    return None


def _rows(table: DocxTable) -> tuple[tuple[str, ...], ...]:
    """Each row's cells, a merged cell once (python-docx repeats it in every column)."""
    out = []
    for row in table.rows:
        cells, last = [], None
        for cell in row.cells:
            if cell._tc is not last:
                cells.append(cell.text)
            last = cell._tc
        out.append(tuple(cells))
    return tuple(out)


def _pptx(data: bytes) -> tuple[list[Part], str]:
    try:
        deck = Presentation(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - as for DOCX
        raise UnreadableError(f"not a readable PPTX file ({type(e).__name__}: {e}); is it "
                              "truncated or damaged?") from None
    parts: list[Part] = []
    for number, slide in enumerate(deck.slides, start=1):
        title = slide.shapes.title
        if title is not None and title.has_text_frame:
            parts.append(Heading(title.text_frame.text, 1, number))
        skip = title.shape_id if title is not None else None
        parts += _shapes([s for s in slide.shapes if s.shape_id != skip], number)
    return parts, deck.core_properties.title or ""


def _shapes(shapes, page: int) -> list[Part]:
    out: list[Part] = []
    for shape in sorted(shapes, key=lambda s: (s.top or 0, s.left or 0)):
        if shape.shape_type == MSO_SHAPE_TYPE.GROUP:
            out += _shapes(list(shape.shapes), page)
        elif shape.has_table:
            out.append(Table(tuple(tuple(cell.text for cell in row.cells)
                                   for row in shape.table.rows), page))
        elif shape.has_text_frame:
            out += [Paragraph(p.text, page) for p in shape.text_frame.paragraphs]
    return out
