"""An atom's window: the sentences of its paragraph around it, as many as fit a token budget.

A sentence alone loses what it refers to ("She discovered the comet in 2011"). The composer's
passage modes show each retrieved atom's window (``composer.windows``); the compiler's
distilling teacher reads it before asking about the atom (``compiler.trainer``).
"""

from __future__ import annotations

from collections.abc import Sequence


def count_tokens(tokenizer, text: str) -> int:
    """``text``'s length in the tokenizer's tokens (no special tokens): the unit of every
    token budget (an atom's length, a window's)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def window(context: Sequence[str], at: int, max_tokens: int, count) -> list[str]:
    """The run of ``context`` around ``context[at]`` that fits ``max_tokens`` (``count(text)``
    tokens each): the atom itself always, then earlier and later sentences in turn, earlier
    first (what a sentence refers back to comes before it). ``max_tokens`` 0: the atom alone."""
    lo = hi = at
    total = count(context[at])
    grew = max_tokens > 0
    while grew:
        grew = False
        for j in (lo - 1, hi + 1):
            if 0 <= j < len(context) and total + (n := count(context[j])) <= max_tokens:
                total += n
                lo, hi = min(lo, j), max(hi, j)
                grew = True
    return list(context[lo:hi + 1])
