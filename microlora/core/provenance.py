"""Where an atom came from, as a person reads it: "report.pdf p. 2, Results > Revenue".

One formatter for every place that shows provenance (``ask --explain``, ``compile
--dry-run``, the server's atoms), so they all say it the same way.
"""

from __future__ import annotations

from collections.abc import Sequence


def cite(source: str, page: int = 0, section: Sequence[str] = (), start: int | None = None,
         end: int | None = None) -> str:
    """``source`` (with ``:start-end``, the span in its extracted text, when given), its page
    ("p. 2", or "slide 2" for a slide deck) and its heading path.

    >>> cite("report.pdf", 2, ["Results"])
    'report.pdf p. 2, Results'
    >>> cite("notes.md", 0, ["Setup", "Linux"], 10, 52)
    'notes.md:10-52, Setup > Linux'
    """
    out = source if start is None else f"{source}:{start}-{end}"
    if page:
        slides = source.lower().split("#")[0].endswith(".pptx")
        out += f" {'slide' if slides else 'p.'} {page}"
    if section:
        out += ", " + " > ".join(section)
    return out
