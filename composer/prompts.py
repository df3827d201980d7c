"""The prompts each answer mode uses.

A base model (no chat template) gets a short few-shot QA prompt, which makes it answer in a
few words on one line, so a newline ends the answer; a model with a chat template gets its
template and stops at its end-of-turn token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from microlora.core.config import TEMPLATES

# Two worked examples of common knowledge teach a base model the answer format; each has a
# passage, shown only in the modes that put passages in the prompt.
_EXAMPLES = (
    ("The Eiffel Tower is a wrought-iron tower in Paris, the capital of France.",
     "In which city is the Eiffel Tower?", "Paris"),
    ("Water boils at 100 degrees Celsius at sea level.",
     "At what temperature does water boil at sea level?", "100 degrees Celsius"),
)
# Where a short answer ends: a line break, a comma or semicolon, an opening parenthesis, or a
# full stop that ends a word of two or more letters (so "John F. Kelly" and "U.S." survive).
ANSWER_END = re.compile(r"\n|[,;]|\s\(|(?<=[^\s.]{2})\s?\.(?=\s|$)")
LINE_END = re.compile(r"\n")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer, question: str, passages: Sequence[str] = (),
                 template: str = "qa") -> str:
    """The text to continue: ``passages`` (empty unless the mode shows them) go before the
    question. The "completion" template continues ``question`` as plain text (a sentence
    to finish, as in cloze-style probes) instead of answering it."""
    question = " ".join(question.split())
    if template == "completion":
        return (" ".join(passages) + "\n\n" if passages else "") + question
    if template != "qa":
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if has_chat_template(tokenizer):
        context = "".join(f"{p}\n" for p in passages)
        header = "Context:\n" if passages else ""
        content = f"Answer in a few words.\n{header}{context}Question: {question}"
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    shots = []
    for passage, q, a in _EXAMPLES:
        shots.append((f"Context: {passage}\n" if passages else "") + f"Question: {q}\nAnswer: {a}")
    context = f"Context: {' '.join(passages)}\n" if passages else ""
    return "\n\n".join(shots) + f"\n\n{context}Question: {question}\nAnswer:"


def uses_chat(tokenizer, template: str) -> bool:
    return template == "qa" and has_chat_template(tokenizer)


def line_break_ids(tokenizer) -> list[int]:
    """The tokens that are nothing but line breaks ("\n", "\n\n" where the vocabulary has
    them): the end of a base model's short answer."""
    ids = set()
    for text in ("\n", "\n\n"):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1 and tokenizer.decode(encoded) == text:  # not an unknown token
            ids.add(encoded[0])
    return sorted(ids)


def stop_pattern(tokenizer, template: str = "qa") -> re.Pattern | None:
    """Where an answer ends: the end of the short answer for the few-shot QA prompt, the end
    of the line for completions; for chat models, the template's end-of-turn token (handled
    by generation itself)."""
    if uses_chat(tokenizer, template):
        return None
    return ANSWER_END if template == "qa" else LINE_END
