"""The passage modes' windows (``microlora.core.windows``), merged for the prompt.

A sentence alone loses what it refers to; the passage modes put each retrieved atom's window
in the prompt instead (a sentence-window retriever). Windows of atoms from one paragraph that
overlap are merged, so no sentence is shown twice.
"""

from __future__ import annotations

from collections.abc import Sequence


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
