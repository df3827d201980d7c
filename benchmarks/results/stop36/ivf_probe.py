"""Scratch (stop 36): IVF-Flat vs IVF with 8-bit and fp16 vectors at scale_bench's clustered
vectors, the same coarse cells for all; k=8 search of one query at a time on one thread, in
memory, at nprobe 16/32/64, and recall@8 against exact search.

    python ivf_probe.py 1000000 ivf_probe_1m.json      (run from benchmarks/, ~15 min)
"""

import json
import os
import sys
import tempfile
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from scale_bench import DIM, clustered  # noqa: E402


def queries(x: np.ndarray, n: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(1)
    q = x[rng.integers(0, len(x), n)] + rng.standard_normal((n, DIM)).astype(np.float32) * (
        0.8 / np.sqrt(DIM))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def main() -> None:
    n, out = int(sys.argv[1]), sys.argv[2]
    faiss.omp_set_num_threads(2)  # build on both cores, search on one
    x = clustered(n, seed=0)
    q = queries(x)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(x)
    want = exact.search(q, 8)[1]
    del exact
    nlist = int(4 * np.sqrt(n))
    sample = x[np.sort(np.random.default_rng(0).choice(n, 40 * nlist, replace=False))]
    t = time.perf_counter()
    flat = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, nlist, faiss.METRIC_INNER_PRODUCT)
    flat.train(sample)
    res = {"n": n, "nlist": nlist, "train_s": time.perf_counter() - t}
    kinds = {"flat": flat}
    for name, qt in (("sq8", faiss.ScalarQuantizer.QT_8bit),
                     ("fp16", faiss.ScalarQuantizer.QT_fp16)):
        coarse = faiss.IndexFlatIP(DIM)
        coarse.add(flat.quantizer.reconstruct_n(0, nlist))  # the same cells
        kinds[name] = faiss.IndexIVFScalarQuantizer(coarse, DIM, nlist, qt,
                                                     faiss.METRIC_INNER_PRODUCT)
        kinds[name].train(sample)  # the scalar quantizer's ranges only
    for name, idx in kinds.items():
        faiss.omp_set_num_threads(2)
        t = time.perf_counter()
        idx.add(x)
        add_s = time.perf_counter() - t
        faiss.omp_set_num_threads(1)
        for nprobe in (16, 32, 64):
            idx.nprobe = nprobe
            for row in q[:50]:
                idx.search(row[None], 8)
            times, got = [], []
            for row in q:
                t0 = time.perf_counter()
                got.append(idx.search(row[None], 8)[1][0])
                times.append((time.perf_counter() - t0) * 1000)
            res[f"{name}_np{nprobe}"] = {
                "p50_ms": float(np.percentile(times, 50)),
                "p99_ms": float(np.percentile(times, 99)),
                "recall8": float(np.mean([len(set(g) & set(w)) / 8 for g, w in zip(got, want)])),
                "top1": float(np.mean([w[0] in g for g, w in zip(got, want)])), "add_s": add_s}
            print(name, nprobe, res[f"{name}_np{nprobe}"], flush=True)
        with tempfile.TemporaryDirectory() as d:
            faiss.write_index(idx, os.path.join(d, "i"))
            res[f"{name}_bytes"] = os.path.getsize(os.path.join(d, "i"))
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
