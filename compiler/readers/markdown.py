"""The sections of a Markdown text: where each heading starts and the heading path it opens.

Markdown keeps its plain-text chunking (its atoms, and so their ids, are as before): only the
provenance is added, so an atom can say which section it came from.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r" {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r" {0,3}(```|~~~)")


def markdown_lines(text: str, keepends: bool = False) -> Iterator[str]:
    """The lines of a Markdown text, ended by \\n, \\r\\n or \\r only (CommonMark's line
    endings): str.splitlines() would also break at U+2028, U+0085 and the like."""
    for line in io.StringIO(text, newline=""):
        yield line if keepends else line.rstrip("\r\n")


def markdown_sections(text: str) -> tuple[tuple[int, tuple[str, ...]], ...]:
    """(offset of the heading's line, heading path) for each ATX (``## Title``) and setext
    (``Title`` over ``===``) heading outside code fences."""
    out: list[tuple[int, tuple[str, ...]]] = []
    path: list[tuple[int, str]] = []
    fence: str | None = None
    offset, previous = 0, None  # previous: (offset, text) of a plain line that may head
    for line in markdown_lines(text, keepends=True):
        body = line.rstrip("\r\n")
        heading = None
        if (m := _FENCE.match(body)) and (fence is None or m.group(1) == fence):
            fence = None if fence else m.group(1)
        elif fence is None:
            if m := _ATX.match(body):
                heading = (offset, len(m.group(1)), (m.group(2) or "").strip())
            elif (m := _SETEXT.match(body)) and previous is not None:
                heading = (previous[0], 1 if m.group(1)[0] == "=" else 2, previous[1])
        if heading and heading[2]:
            start, level, title = heading
            while path and path[-1][0] >= level:
                path.pop()
            path.append((level, title))
            out.append((start, tuple(t for _, t in path)))
        plain = fence is None and heading is None and body.strip() and not _FENCE.match(body)
        previous = (offset, body.strip()) if plain else None
        offset += len(line)
    return tuple(out)
