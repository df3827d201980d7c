"""An atom's window: the sentences of its paragraph around it, as many as fit a token budget.

A sentence alone loses what it refers to ("She discovered the comet in 2011"); the passage
modes put each retrieved atom's window in the prompt instead (a sentence-window retriever).
Windows of atoms from one paragraph that overlap are merged, so no sentence is shown twice.
"""

from __future__ import annotations

from collections.abc import Sequence


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


def merge(windows: Sequence[Sequence[str]]) -> list[list[str]]:
    """Windows in rank order, those that share a sentence (runs of one paragraph) merged into
    one run, so every sentence appears once."""
    out: list[list[str]] = []
    for w in windows:
        for run in out:
            shared = [i for i, s in enumerate(w) if s in run]
            if shared:
                run[:0] = [s for s in w[:shared[0]] if s not in run]
                run.extend(s for s in w[shared[-1] + 1:] if s not in run)
                break
        else:
            out.append(list(w))
    return out
