"""How counts read in the CLI's output: "1 atom", "2 atoms", never "1 atoms"."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word``, made plural unless ``n`` is 1 (``many`` where "s" is wrong)."""
    return f"{n} {word if n == 1 else many or word + 's'}"
