"""Compile the docs tune split (153 atoms), recording current and peak RSS after each batch.
python mem_probe.py DTYPE TRIM OUT.json   (TRIM 1: malloc_trim(0) after each batch)"""
import ctypes, json, os, resource, sys, tempfile, time
from pathlib import Path
from microlora.core.config import TrainConfig
from compiler.documents import Document
from compiler.pipeline import compile_documents
from microlora.core.embedder import load_embedder
from microlora.core.models import ensure_default_model, load_base_model
from microlora.evaluation.datasets import load_dataset
dtype, trim, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if trim == 2:  # fixed mmap threshold: big blocks mmapped, returned on free
    assert ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20) == 1
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
ds = load_dataset("benchmarks/data/docs_dev.jsonl", split="tune", limit=31)
docs = [Document(source=pid, text=t) for pid, t in ds.passages.items()]
base = load_base_model(ensure_default_model(), dtype=dtype); emb = load_embedder()
rss0 = rss(); t = time.perf_counter(); times = []
libc = ctypes.CDLL("libc.so.6")
def progress(done, total):
    now = rss()
    if trim == 1:
        libc.malloc_trim(0)
    times.append((done, round(time.perf_counter() - t, 1), round(now), round(rss()), round(peak())))
    print(times[-1], flush=True)
with tempfile.TemporaryDirectory() as d:
    report = compile_documents(docs, Path(d) / "s", base=base, embedder=emb, namespace="t",
                               train_config=TrainConfig(rank=2), progress=progress)
out = {"dtype": dtype, "trim": trim, "seconds": round(time.perf_counter() - t, 1), "atoms": report.atoms,
       "atom_steps": report.atom_steps, "mean_final_loss": report.mean_final_loss,
       "peak_rss_mb": round(peak()), "rss_after_load_mb": round(rss0),
       "progress [done, s, rss, rss after trim, peak]": times}
print(json.dumps(out)); Path(out_path).write_text(json.dumps(out, indent=1))
