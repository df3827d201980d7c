"""E-books (.epub) into headings, paragraphs and tables, chapter by chapter.

ebooklib reads the book and its spine (the chapters in reading order); each chapter is clean
XHTML with no navigation to remove, so it is read with lxml as it is: h1-h6 are headings,
tables are tables, and every other block element that holds no other block is a paragraph.
"""

from __future__ import annotations

import io
import warnings

import ebooklib
import lxml.html
from ebooklib import epub

from compiler.readers.structure import Heading, Paragraph, Part, Table, UnreadableError

_HEADINGS = {f"h{i}" for i in range(1, 7)}
_SKIP = {"head", "script", "style", "nav"}
_BLOCKS = _HEADINGS | {"address", "article", "aside", "blockquote", "body", "dd", "div", "dl",
                       "dt", "figcaption", "figure", "footer", "header", "li", "main", "ol",
                       "p", "pre", "section", "table", "td", "th", "tr", "ul"}


def read(data: bytes, suffix: str = ".epub") -> tuple[list[Part], str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ebooklib's notices about its future defaults
            book = epub.read_epub(io.BytesIO(data), options={"ignore_ncx": True})
    except Exception as e:  # noqa: BLE001 - a damaged zip or package raises many kinds
        raise UnreadableError(f"not a readable EPUB file ({type(e).__name__}: {e})") from None
    parts: list[Part] = []
    for idref, _ in book.spine:
        item = book.get_item_with_id(idref)
        if item is None or isinstance(item, epub.EpubNav) or \
                item.get_type() != ebooklib.ITEM_DOCUMENT:
            continue
        content = item.get_content()
        if content.strip():
            _walk(lxml.html.fromstring(content), parts)
    titles = book.get_metadata("DC", "title")
    return parts, titles[0][0] if titles else ""


def _tag(element) -> str:
    return element.tag.lower() if isinstance(element.tag, str) else ""


def _walk(element, parts: list[Part]) -> None:
    tag = _tag(element)
    if not tag or tag in _SKIP:
        return
    if tag in _HEADINGS:
        parts.append(Heading(element.text_content(), int(tag[1])))
    elif tag == "table":
        parts.append(Table(tuple(tuple(c.text_content() for c in row if _tag(c) in ("td", "th"))
                                 for row in element.iter("tr"))))
    elif not any(_tag(d) in _BLOCKS for d in element.iterdescendants()):
        parts.append(Paragraph(element.text_content()))
    else:
        if element.text and element.text.strip():
            parts.append(Paragraph(element.text))
        for child in element:
            _walk(child, parts)
            if child.tail and child.tail.strip():
                parts.append(Paragraph(child.tail))
