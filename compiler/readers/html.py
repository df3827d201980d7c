"""Web pages (.html, .htm) into headings, paragraphs and tables: the main text only.

trafilatura finds the page's main content and leaves out navigation, banners, sidebars and
footers; its XML output keeps the headings (with their level), paragraphs, lists and tables
(with header cells), which are read here in order.
"""

from __future__ import annotations

import trafilatura
from lxml import etree

from compiler.readers.structure import Heading, Paragraph, Part, Table, UnreadableError

_BLOCKS = {"head", "p", "list", "item", "table", "quote"}  # <code> and <hi> in a <p> are inline


def read(data: bytes, suffix: str = ".html") -> tuple[list[Part], str]:
    """The page's main text as parts, and its title ("" if none)."""
    try:
        xml = trafilatura.extract(data, output_format="xml", include_tables=True,
                                  include_comments=False, include_formatting=False,
                                  include_links=False, include_images=False, with_metadata=True)
    except Exception as e:  # noqa: BLE001 - a page that the parser cannot take
        raise UnreadableError(f"not a readable HTML page ({type(e).__name__}: {e})") from None
    if not xml:
        return [], ""
    root = etree.fromstring(xml)
    parts: list[Part] = []
    main = root.find("main")
    if main is not None:
        if main.text and main.text.strip():
            parts.append(Paragraph(main.text))
        _walk(main, parts)
    return parts, root.get("title") or ""


def _walk(element, parts: list[Part]) -> None:
    for child in element:
        tag = child.tag
        if tag == "head":
            rend = child.get("rend") or ""
            level = int(rend[1]) if len(rend) == 2 and rend[1].isdigit() else 2
            parts.append(Heading(_text(child), level))
        elif tag == "table":
            parts.append(Table(tuple(tuple(_text(cell) for cell in row.iter("cell"))
                                     for row in child.iter("row"))))
        elif not any(c.tag in _BLOCKS for c in child):
            parts.append(Paragraph(_text(child)))  # a paragraph, list item, code block...
        else:  # lists, and quotes or items that hold paragraphs: their text in order
            if child.text and child.text.strip():
                parts.append(Paragraph(child.text))
            _walk(child, parts)
        if child.tail and child.tail.strip():
            parts.append(Paragraph(child.tail))


def _text(element) -> str:
    return " ".join("".join(element.itertext()).split())
