"""Paired, mirrored timing: enough for one run to decide an overhead of a few percent on a
machine whose pace drifts by more than that between runs.

A block runs every variant twice, in mirrored order (A B C C B A), so a pace that drifts
linearly through the block costs each variant the same; a variant's time in the block is the
sum of its two runs. An overhead is then taken per block (variant / base - 1, both from the same
few seconds of the machine's life), and the run reports the median of those and the range of
the middle half (25th to 75th percentile of the blocks). Medians of the variants' times taken
separately and then divided (what the benchmarks did before) let a slow stretch of one variant
stand against a fast stretch of another.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import numpy as np


def mirrored_blocks(fns: dict[str, Callable[[], float]], blocks: int,
                    progress: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Per variant, its time in each block (the sum of its two runs). ``fns`` return seconds;
    a garbage collection runs before each, untimed, so none lands inside one variant's run."""
    names = list(fns)
    out: dict[str, list[float]] = {name: [] for name in names}
    for b in range(blocks):
        seconds = dict.fromkeys(names, 0.0)
        for name in names + names[::-1]:
            gc.collect()
            seconds[name] += fns[name]()
        for name in names:
            out[name].append(seconds[name])
        if progress:
            progress(b + 1)
    return out


def overhead(times: dict[str, list[float]], variant: str, base: str) -> dict[str, float]:
    """``variant``'s overhead over ``base``, block by block: median and middle half."""
    ratios = np.asarray(times[variant]) / np.asarray(times[base]) - 1
    return {"median": float(np.median(ratios)), "q25": float(np.percentile(ratios, 25)),
            "q75": float(np.percentile(ratios, 75)), "blocks": len(ratios)}
