"""Compile the docs tune split (153 atoms), recording current and peak RSS after each batch.

    BATCH=32 RANK=2 python mem_probe.py DTYPE TRIM OUT.json

TRIM 0: glibc as is; 1: malloc_trim(0) after each batch; 2: a fixed 4 MiB mmap threshold.
RANK 2 (the default here), as the first runs in RESULTS.md ("Compile memory") were made.
"""

import ctypes
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from compiler.documents import Document
from compiler.pipeline import compile_documents
from microlora.core.config import TrainConfig
from microlora.core.embedder import load_embedder
from microlora.core.models import ensure_default_model, load_base_model
from microlora.evaluation.datasets import load_dataset

M_MMAP_THRESHOLD = -3


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    dtype, trim, out_path = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    batch = int(os.environ.get("BATCH", 32))
    rank = int(os.environ.get("RANK", 2))
    libc = ctypes.CDLL("libc.so.6")
    if trim == 2:
        assert libc.mallopt(M_MMAP_THRESHOLD, 4 << 20) == 1
    ds = load_dataset("benchmarks/data/docs_dev.jsonl", split="tune", limit=31)
    docs = [Document(source=pid, text=t) for pid, t in ds.passages.items()]
    base = load_base_model(ensure_default_model(), dtype=dtype)
    emb = load_embedder()
    rss0, t0, rows = rss_mb(), time.perf_counter(), []

    def progress(done, total):
        now = rss_mb()
        if trim == 1:
            libc.malloc_trim(0)
        rows.append((done, round(time.perf_counter() - t0, 1), round(now), round(rss_mb()),
                     round(peak_mb())))
        print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as d:
        report = compile_documents(docs, Path(d) / "s", base=base, embedder=emb, namespace="t",
                                   train_config=TrainConfig(rank=rank, batch_atoms=batch),
                                   progress=progress)
    out = {"dtype": dtype, "trim": trim, "batch_atoms": batch, "rank": rank,
           "seconds": round(time.perf_counter() - t0, 1), "atoms": report.atoms,
           "atom_steps": report.atom_steps, "mean_final_loss": report.mean_final_loss,
           "peak_rss_mb": round(peak_mb()), "rss_after_load_mb": round(rss0),
           "progress [done, s, rss, rss after trim, peak]": rows}
    print(json.dumps(out))
    out_path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
