"""Scratch (stop 36): a million-atom store's IVF index (IVF-Flat, as stop 35 built it) searched
memory-mapped, as a store opens it, and read into memory: one thread, 1,000 queries each after
50 warm-up, the file read through first (every page cached), in mirrored blocks.

    python mmap_probe.py STORE/index/NAMESPACE.faiss mmap_probe.json   (run from benchmarks/)
"""

import json
import os
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from ivf_probe import queries  # noqa: E402
from scale_bench import clustered  # noqa: E402


def main() -> None:
    path, out = sys.argv[1], sys.argv[2]
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass
    q = queries(clustered(1_000_000, seed=0))
    faiss.omp_set_num_threads(1)
    indexes = {"mmap": faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY),
               "memory": faiss.read_index(path)}
    for index in indexes.values():
        faiss.downcast_index(index).nprobe = 32
    times = {name: [] for name in indexes}
    for order in (list(indexes), list(indexes)[::-1]):
        for name in order:
            for row in q[:50]:
                indexes[name].search(row[None], 8)
            for row in q:
                t0 = time.perf_counter()
                indexes[name].search(row[None], 8)
                times[name].append((time.perf_counter() - t0) * 1000)
    res = {name: {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99))}
           for name, t in times.items()}
    print(res)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
