"""A sentence that opens with a pronoun, with the pronoun replaced by the name it refers to.

"She later founded a glassworks in Carrow Point." tells an adapter nothing about *whom*, and
a question that names her ("Where did Talia Orven found her glassworks?") neither retrieves
it nor matches its question views. With ``TrainConfig.resolve_pronouns`` an atom is trained,
embedded and asked about as "Talia Orven later founded a glassworks in Carrow Point." (its
stored text, window and id stay the original's). The antecedent is the first name of the
nearest earlier sentence of its paragraph that has one: crude, cheap, no model call, and
right for the commonest pattern (a paragraph about one subject, its later sentences
referring back to it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from compiler.views import names

_OPENING = re.compile(r"^(He|She|They|His|Her|Their)\b")  # "It" is rarely a name: left alone
_POSSESSIVE = {"His", "Her", "Their"}


def resolve_pronoun(context: Sequence[str], at: int) -> str:
    """``context[at]`` with an opening pronoun replaced by its antecedent (unchanged when it
    opens with none, or no earlier sentence of ``context`` names anyone)."""
    resolved: list[str] = []  # earlier sentences resolved first: "She ... She ..." chains
    for sentence in context[:at + 1]:
        m = _OPENING.match(sentence)
        antecedent = next((_name(n) for earlier in reversed(resolved)
                           for n in names(earlier)[:1]), None) if m else None
        if antecedent:
            sentence = antecedent + ("'s" if m.group() in _POSSESSIVE else "") + \
                sentence[m.end():]
        resolved.append(sentence)
    return resolved[at]


def subject(context: Sequence[str], at: int) -> str:
    """The paragraph's subject as seen from ``context[at]``: the first name of its earliest
    sentence up to ``at`` that has one ("" when none does). Crude like the rest: right for a
    paragraph that names what it is about first."""
    for sentence in context[:at + 1]:
        found = names(sentence)
        if found:
            return _name(found[0])
    return ""


def unnamed_subject(context: Sequence[str], at: int) -> str:
    """The paragraph's ``subject`` when ``context[at]`` (pronouns resolved) does not name it,
    else ""."""
    topic = subject(context, at)
    return "" if topic in resolve_pronoun(context, at) else topic


def about(context: Sequence[str], at: int) -> str:
    """``context[at]`` (pronouns resolved) with its paragraph's subject in front when it does
    not name it: "Talia Orven: In 1891 she opened her own furnace in Carrow Point." A
    question names the subject ("Where did Talia Orven open her furnace?"); the bare sentence
    does not, so it is neither retrieved for the question nor taught to answer it."""
    sentence, topic = resolve_pronoun(context, at), unnamed_subject(context, at)
    return f"{topic}: {sentence}" if topic else sentence


def _name(name: str) -> str:
    """A name as it can stand in a sentence: no trailing full stop or possessive."""
    name = name.rstrip(".")
    return name[:-2] if name.endswith(("'s", "’s")) else name
