"""Question views of an atom: its sentence asked back as short questions, each answered by one
of its names, numbers or dates, in the QA format the composer prompts with.

Models recall a fact far better when they were trained on it in question form, not only as a
sentence to continue; an atom trained on its views as well learns to *answer* with its fact.
The span is found by surface patterns (a run of capitalised words, a number or year), the
question by putting a wh-word in its place: crude, cheap, and no model call.

Two styles: "sentence" asks with the whole sentence around the hole ("Madge Blake was born in
what, Kansas in 1899?"); "clause" asks with only the clause around it, grown to a few words
("Who voices Bumblebee, an Autobot scout?"), closer to how people ask, and a leading title
("President", "King") stays in the question rather than the answer.
"""

from __future__ import annotations

import re

from microlora.core.config import VIEW_STYLES

# The tail of composer.prompts' QA prompt ("Question: ...\nAnswer: ..."), without the shots.
QUESTION_FORMAT = "Question: {question}\nAnswer:"
_NAME = re.compile(r"(?<![\w'])(?:[A-Z][\w'’.-]*(?:\s+(?:of|de|von|van|the|and|da|di|del|le|la|y)"
                   r")?\s+)*[A-Z][\w'’.-]*")
_NUMBER = re.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})s?\b|\b\d[\d,.]*\b")
# Where a clause ends: a comma, semicolon, colon, or a dash set off by spaces (a bracketed
# aside, often the very name asked for, stays in its clause).
_CLAUSE_BREAK = re.compile(r"\s*(?:[,;:]|\s--\s|\s[—–]\s)\s*")
_TITLES = {"president", "king", "queen", "prince", "princess", "emperor", "pope", "saint",
           "sir", "lord", "lady", "general", "captain", "governor", "senator", "dr", "dr.",
           "prof", "prof.", "mr", "mr.", "mrs", "mrs.", "ms", "ms.", "judge", "chief"}
_CLAUSE_WORDS = 8  # a clause shorter than this grows by its neighbours


def question_views(sentence: str, limit: int, style: str = "sentence", topic: str = ""
                   ) -> list[tuple[str, str]]:
    """Up to ``limit`` (prompt, answer) pairs: the prompt is a question about ``sentence`` in
    the composer's QA format, the answer a span of it (plus the line break that ends it).
    ``topic``: what the sentence is about when it does not say, put before each question
    ("Talia Orven: In 1891 she opened her own furnace in what?"), never an answer."""
    if style not in VIEW_STYLES:
        raise ValueError(f"view style must be one of {VIEW_STYLES}, got {style!r}")
    out = []
    for start, end, wh in _spans(sentence)[:limit]:
        lo, hi = 0, len(sentence)
        if style == "clause":
            start = _after_title(sentence, start, end)
            lo, hi = _clause(sentence, start, end)
        answer = sentence[start:end].strip(" .,")
        if len(answer) < 2:
            continue
        before, after = sentence[lo:start].strip(), sentence[end:hi].strip().rstrip(".")
        question = f"{before} {wh.lower()} {after}" if before else f"{wh} {after}"
        if style == "clause":
            question = _balanced(question).strip(" .,;:")
        question = " ".join(f"{question}?".split())
        if topic:
            question = f"{topic}: {question}"
        out.append((QUESTION_FORMAT.format(question=question), f" {answer}\n"))
    return out


def _spans(sentence: str) -> list[tuple[int, int, str]]:
    """(start, end, wh-word) of every number and name, the longest first."""
    spans = []
    for m in _NUMBER.finditer(sentence):
        spans.append((m.start(), m.end(), "When" if _is_year(m.group()) else "How many"))
    for m in _names(sentence):
        if any(s < m.end() and m.start() < e for s, e, _ in spans):
            continue
        spans.append((m.start(), m.end(), "Who" if _looks_personal(m.group()) else "What"))
    return sorted(spans, key=lambda s: -(s[1] - s[0]))


def names(sentence: str) -> list[str]:
    """The sentence's names (runs of capitalised words), in order."""
    return [m.group() for m in _names(sentence)]


def _names(sentence: str) -> list[re.Match]:
    # the sentence's capitalised first word is not a name by itself
    return [m for m in _NAME.finditer(sentence) if m.start() > 0 or " " in m.group()]


def _after_title(sentence: str, start: int, end: int) -> int:
    """Where the name starts once a leading title ("President Lauren Lapkus") is left out."""
    words = sentence[start:end].split()
    if len(words) >= 3 and words[0].lower() in _TITLES:
        return sentence.index(words[1], start + len(words[0]))
    return start


def _clause(sentence: str, start: int, end: int) -> tuple[int, int]:
    """The character range of the clause holding [start, end), widened clause by clause (the
    shorter side first) until it has a few words besides the span."""
    breaks = [m for m in _CLAUSE_BREAK.finditer(sentence)
              if m.end() <= start or m.start() >= end]
    lefts = [0] + [m.end() for m in breaks]  # where a clause can begin
    rights = [m.start() for m in breaks] + [len(sentence)]  # and end
    lo = max(b for b in lefts if b <= start)
    hi = min(b for b in rights if b >= end)

    def words(a: int, b: int) -> int:
        return len(re.findall(r"\w+", sentence[a:start] + " " + sentence[end:b]))

    while words(lo, hi) < _CLAUSE_WORDS and (lo > 0 or hi < len(sentence)):
        left = max((b for b in lefts if b < lo), default=None)
        right = min((b for b in rights if b > hi), default=None)
        if right is None or (left is not None and lo - left <= right - hi):
            lo = left
        else:
            hi = right
    return lo, hi


def _balanced(text: str) -> str:
    """``text`` without brackets whose partner the clause cut off."""
    keep, opened = list(text), []
    for i, c in enumerate(text):
        if c in "([":
            opened.append(i)
        elif c in ")]":
            if opened:
                opened.pop()
            else:
                keep[i] = ""
    for i in opened:
        keep[i] = ""
    return " ".join("".join(keep).split())


def _is_year(text: str) -> bool:
    return bool(re.fullmatch(r"(1[0-9]{3}|20[0-9]{2})s?", text))


def _looks_personal(name: str) -> bool:
    """Two or three capitalised words with no place-like word: probably a person."""
    words = name.split()
    return 2 <= len(words) <= 3 and all(w[:1].isupper() for w in words)
