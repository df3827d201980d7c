"""A/B: length groups per step vs compile time and peak RSS.
One process per setting: python chunk_ab.py ROWS OUT.json"""
import json, resource, sys, tempfile, time
from pathlib import Path
from microlora.core.config import TrainConfig
groups = int(sys.argv[1])
from compiler.documents import Document
from compiler.pipeline import compile_documents
from microlora.core.embedder import load_embedder
from microlora.core.models import ensure_default_model, load_base_model
from microlora.evaluation.datasets import load_dataset
ds = load_dataset("benchmarks/data/docs_dev.jsonl", split="tune", limit=31)
docs = [Document(source=pid, text=t) for pid, t in ds.passages.items()]
base = load_base_model(ensure_default_model()); emb = load_embedder()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter(); times = []
with tempfile.TemporaryDirectory() as d:
    report = compile_documents(docs, Path(d) / "s", base=base, embedder=emb, namespace="t", train_config=TrainConfig(length_groups=groups),
                               progress=lambda done, total: times.append((done, round(time.perf_counter() - t, 1),
                                   round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))))
out = {"length_groups": groups, "seconds": round(time.perf_counter() - t, 1), "atoms": report.atoms,
       "atom_steps": report.atom_steps, "mean_final_loss": report.mean_final_loss, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
       "rss_after_load_mb": round(rss0), "progress": times}
print(json.dumps(out)); Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
