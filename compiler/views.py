"""Question views of an atom: its sentence asked back as short questions, each answered by one
of its names, numbers or dates, in the QA format the composer prompts with.

Models recall a fact far better when they were trained on it in question form, not only as a
sentence to continue; an atom trained on its views as well learns to *answer* with its fact.
The span is found by surface patterns (a run of capitalised words, a number or year), the
question by putting a wh-word in its place ("Madge Blake was born in what, Kansas?"): crude,
cheap, and no model call.
"""

from __future__ import annotations

import re

# The tail of composer.prompts' QA prompt ("Question: ...\nAnswer: ..."), without the shots.
QUESTION_FORMAT = "Question: {question}\nAnswer:"
_NAME = re.compile(r"(?<![\w'])(?:[A-Z][\w'’.-]*(?:\s+(?:of|de|von|van|the|and|da|di|del|le|la|y)"
                   r")?\s+)*[A-Z][\w'’.-]*")
_NUMBER = re.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})s?\b|\b\d[\d,.]*\b")


def question_views(sentence: str, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` (prompt, answer) pairs: the prompt is a question about ``sentence`` in
    the composer's QA format, the answer a span of it (plus the line break that ends it)."""
    spans = []
    for m in _NUMBER.finditer(sentence):
        spans.append((m.start(), m.end(), "When" if _is_year(m.group()) else "How many"))
    for m in _NAME.finditer(sentence):
        if m.start() == 0 and " " not in m.group():
            continue  # the sentence's capitalised first word is not a name by itself
        if any(s < m.end() and m.start() < e for s, e, _ in spans):
            continue
        spans.append((m.start(), m.end(), "Who" if _looks_personal(m.group()) else "What"))
    out = []
    for start, end, wh in sorted(spans, key=lambda s: -(s[1] - s[0]))[:limit]:
        answer = sentence[start:end].strip(" .,")
        if len(answer) < 2:
            continue
        before, after = sentence[:start].strip(), sentence[end:].strip().rstrip(".")
        question = f"{before} {wh.lower()} {after}?" if start else f"{wh} {after}?"
        out.append((QUESTION_FORMAT.format(question=" ".join(question.split())), f" {answer}\n"))
    return out


def _is_year(text: str) -> bool:
    return bool(re.fullmatch(r"(1[0-9]{3}|20[0-9]{2})s?", text))


def _looks_personal(name: str) -> bool:
    """Two or three capitalised words with no place-like word: probably a person."""
    words = name.split()
    return 2 <= len(words) <= 3 and all(w[:1].isupper() for w in words)
