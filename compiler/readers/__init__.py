"""Formatted documents into structured ``Document``s: PDF, HTML, DOCX, PPTX and EPUB.

Each format is read by a well-kept library (the optional ``docs`` extra): PDF by pdfplumber
on pdfminer.six (pages, fonts, ruled tables), HTML by trafilatura (the main text without
navigation, banners and footers), DOCX by python-docx, PPTX by python-pptx, EPUB by
ebooklib. A reader turns the file into headings, paragraphs and tables with their pages
(``structure``); ``structure.assemble`` makes them one Document whose blocks are cut into
atoms and whose sections and pages are each atom's provenance.
"""

from __future__ import annotations

import importlib

from compiler.documents import Document
from compiler.readers.structure import UnreadableError, assemble

DOCS_EXTRA = "pip install 'microlora[docs]'"

# suffix -> (module in this package, what it says when the file gives no text)
_READERS = {
    ".pdf": ("pdf", "no text layer (an image-only or scanned PDF?); OCR it first, e.g. with "
                    "ocrmypdf, and compile the result"),
    ".html": ("html", "no main text found in this page (is its text loaded by JavaScript? "
                      "save the page after it has loaded)"),
    ".htm": ("html", "no main text found in this page (is its text loaded by JavaScript? "
                     "save the page after it has loaded)"),
    ".docx": ("office", "no text in this document"),
    ".pptx": ("office", "no text on these slides"),
    ".epub": ("epub", "no text in this book"),
}


def read_formatted(source: str, suffix: str, data: bytes) -> Document:
    """The document in ``data`` (a file of type ``suffix``); UnreadableError says why not."""
    name, empty = _READERS[suffix]
    try:
        module = importlib.import_module(f"compiler.readers.{name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("compiler"):
            raise
        raise UnreadableError(f"reading {suffix} files needs the docs extra ({e.name} is not "
                              f"installed): {DOCS_EXTRA}") from None
    parts, title = module.read(data, suffix)
    doc = assemble(source, parts, title)
    if not doc.blocks:
        raise UnreadableError(empty)
    return doc


__all__ = ["DOCS_EXTRA", "UnreadableError", "read_formatted"]
