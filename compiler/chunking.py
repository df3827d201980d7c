"""Documents into knowledge atoms: one sentence each, by default.

DESIGN.md's measurements: whole passages as atoms answered 0 of 16 questions where one-sentence
atoms matched in-context RAG, so an atom is a sentence. Fragments too short to carry a fact
(headings, "See below.") join the next sentence; sentences longer than the
token limit split at clause boundaries, and at token boundaries as a last resort. Every atom
is an exact slice of its document: ``doc.text[atom.start:atom.end] == atom.text``.

With ``ChunkConfig.sentences`` > 1 an atom is a run of up to that many consecutive sentences
of one paragraph (its ``parts``), so a pronoun and the name it refers to can share an atom.

Each atom also keeps its paragraph (the atoms around it, up to ``CONTEXT_ATOMS`` either side):
the text a pronoun refers back to, which the composer reads as the atom's window.

A formatted document (``compiler.readers``) is cut block by block: its paragraphs as above,
never joined across a heading, and each line of a table (a row with its header) as one atom,
its table around it as its context. Every atom records its page and heading path.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from compiler.documents import Block, Document
from microlora.core.config import ChunkConfig
from microlora.core.windows import count_tokens

# A sentence ends at a run of . ! ? … (plus closing quotes/brackets) before whitespace. The
# runs are found by a pattern that cannot backtrack and the rest is checked by hand: a pattern
# with the lookahead in it retries every position of a long run of dots ("." * 20000: 7 s).
_END_PUNCT = re.compile(r"[.!?…]+")
_CLOSERS = frozenset("\"'”’)]")
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_CLAUSE_END = re.compile(r"[,;:]\s|\s[—–-]\s")
CONTEXT_ATOMS = 8  # paragraph atoms kept on either side of an atom, for its window
# Words whose trailing period does not end a sentence.
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e",
                  "no", "vol", "fig", "inc", "ltd", "co", "corp", "mt", "ft", "approx", "ca"}


@dataclass(frozen=True)
class Atom:
    """text: ``doc.text[start:end]``. context: the atoms of its paragraph around it (itself
    at ``context[at]``), what its window is cut from. page, section: where it is in its
    document (0 and () where the format has none). Only text and title are its identity."""

    text: str
    source: str
    start: int
    end: int
    title: str = ""
    context: tuple[str, ...] = ()
    at: int = 0
    page: int = 0
    section: tuple[str, ...] = ()
    parts: tuple[tuple[int, int], ...] = ()


def chunk_document(doc: Document, tokenizer, config: ChunkConfig = ChunkConfig()) -> list[Atom]:
    out = []
    for block in doc.blocks or (Block(0, len(doc.text)),):
        table = block.kind == "table"
        for group in (_rows if table else _prose)(doc.text, block.start, block.end, tokenizer,
                                                  config):
            runs = [[span] for span in group] if table else _runs(group, config.sentences)
            texts = tuple(doc.text[run[0][0]:run[-1][1]] for run in runs)
            for i, run in enumerate(runs):
                s, e = run[0][0], run[-1][1]
                lo = max(0, i - CONTEXT_ATOMS)
                page, section = doc.place(s)
                parts = tuple((a - s, b - s) for a, b in run) if len(run) > 1 else ()
                out.append(Atom(texts[i], doc.source, s, e, doc.title,
                                texts[lo:i + CONTEXT_ATOMS + 1], i - lo, page, section, parts))
    return out


def _runs(spans: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    """A paragraph's sentence spans in runs of ``size`` (the last run may be shorter)."""
    return [spans[i:i + size] for i in range(0, len(spans), size)]


def _prose(text: str, start: int, end: int, tokenizer, config: ChunkConfig
           ) -> list[list[tuple[int, int]]]:
    """``text[start:end]``'s sentence spans, grouped by paragraph."""
    paragraphs = _paragraphs(text, start, end)
    sentences = [s for p_start, p_end in paragraphs for s in _sentences(text, p_start, p_end)]
    spans = [piece for s, e in _join_short(sentences, config.min_chars)
             for piece in _split_long(text, s, e, tokenizer, config.max_tokens)]
    # a span belongs to the paragraph it ends in (a heading joins the sentence it heads)
    ends = [p_end for _, p_end in paragraphs]
    by_paragraph: dict[int, list[tuple[int, int]]] = {}
    for s, e in spans:
        by_paragraph.setdefault(bisect.bisect_left(ends, e), []).append((s, e))
    return list(by_paragraph.values())


def _rows(text: str, start: int, end: int, tokenizer, config: ChunkConfig
          ) -> list[list[tuple[int, int]]]:
    """A table's lines, each one atom (split only if over the token limit): one group."""
    spans, at = [], start
    for line in text[start:end].split("\n"):
        s, e = _strip(text, at, at + len(line))
        if s < e:
            spans += _split_long(text, s, e, tokenizer, config.max_tokens)
        at += len(line) + 1
    return [spans] if spans else []


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _paragraphs(text: str, start: int, end: int) -> list[tuple[int, int]]:
    out = []
    for m in _PARAGRAPH.finditer(text, start, end):
        out.append((start, m.start()))
        start = m.end()
    out.append((start, end))
    return [s for s in (_strip(text, a, b) for a, b in out) if s[0] < s[1]]


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """The sentences of ``text[start:end]``. Linear in its length: each candidate end looks
    back only at the word before it, never at the whole sentence so far (which grows without
    bound when no candidate ends one: "a. a. a. ...")."""
    out, s = [], start
    for m in _END_PUNCT.finditer(text, start, end):
        e = m.end()
        while e < end and text[e] in _CLOSERS:
            e += 1
        if e == end or not text[e].isspace():
            continue  # "3.14", "e.g.,": not before whitespace
        if text[m.start()] == "." and _abbreviation(_word_before(text, s, m.start())):
            continue  # "Dr. Smith", "J. R. R. Tolkien"
        out.append(_strip(text, s, e))
        s = e
    out.append(_strip(text, s, end))
    return [x for x in out if x[0] < x[1]]


_LONGEST_ABBREVIATION = max(map(len, _ABBREVIATIONS))


def _word_before(text: str, start: int, at: int) -> str | None:
    """The last word of ``text[start:at]`` ("" if none), or None when it is longer than any
    abbreviation (so it is not one; lower-casing never shortens a word)."""
    i = at
    while i > start and text[i - 1].isspace():
        i -= 1
    j = i
    while j > start and not text[j - 1].isspace():
        if i - j == _LONGEST_ABBREVIATION:
            return None
        j -= 1
    return text[j:i]


def _abbreviation(word: str | None) -> bool:
    if word is None:
        return False
    word = word.lower()
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _join_short(spans: list[tuple[int, int]], min_chars: int) -> list[tuple[int, int]]:
    """Join each fragment shorter than ``min_chars`` to the next sentence (a heading to the
    paragraph it heads), and a short last fragment to the previous one."""
    out: list[tuple[int, int]] = []
    pending: int | None = None  # start of fragments waiting for a sentence
    for s, e in spans:
        start = s if pending is None else pending
        if e - start < min_chars:
            pending = start
            continue
        out.append((start, e))
        pending = None
    if pending is not None:
        if out:
            out[-1] = (out[-1][0], spans[-1][1])
        else:
            out.append((pending, spans[-1][1]))
    return out


def _split_long(text: str, start: int, end: int, tokenizer, max_tokens: int
                ) -> list[tuple[int, int]]:
    if count_tokens(tokenizer, text[start:end]) <= max_tokens:
        return [(start, end)]
    # Greedily pack clauses while they fit.
    cuts = [m.end() for m in _CLAUSE_END.finditer(text, start, end)] + [end]
    out, s, last_fit = [], start, None
    for c in cuts:
        if count_tokens(tokenizer, text[s:c]) <= max_tokens:
            last_fit = c
            continue
        if last_fit is not None:
            out.append(_strip(text, s, last_fit))
            s, last_fit = last_fit, None
            if count_tokens(tokenizer, text[s:c]) <= max_tokens:
                last_fit = c
                continue
        out += _split_tokens(text, s, c, tokenizer, max_tokens)  # a clause too long alone
        s = c
    if s < end:
        out.append(_strip(text, s, end))
    return [x for x in out if x[0] < x[1]]


def _split_tokens(text: str, start: int, end: int, tokenizer, max_tokens: int
                  ) -> list[tuple[int, int]]:
    """Last resort: cut every ``max_tokens`` tokens, at the tokenizer's own offsets."""
    enc = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    out = []
    for i in range(0, len(offsets), max_tokens):
        piece = offsets[i:i + max_tokens]
        out.append(_strip(text, start + piece[0][0], start + piece[-1][1]))
    return [x for x in out if x[0] < x[1]]
