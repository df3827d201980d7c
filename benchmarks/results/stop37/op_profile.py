"""Op-level profile (torch.profiler) of compile_bench's --quick compile: where the CPU time goes."""
import sys, tempfile, time, argparse
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
from torch.profiler import profile, ProfilerActivity
from compile_bench import models_and_corpus, train_microlora
from microlora.core.config import TrainConfig

args = argparse.Namespace(quick=True, atoms=None, base_model=None, embedder=None, device=None,
                          base_dtype=None)
base, embedder, docs = models_and_corpus(args)
with tempfile.TemporaryDirectory() as tmp:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _, seconds, report = train_microlora(base, embedder, docs, TrainConfig(), Path(tmp) / "s")
print("seconds", seconds, "atom_steps", report.atom_steps)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
rows = []
for e in prof.key_averages(group_by_input_shape=True):
    if e.key in ("aten::mm", "aten::bmm", "aten::addmm"):
        rows.append((e.self_cpu_time_total / 1e6, e.count, e.key, str(e.input_shapes)[:120]))
rows.sort(reverse=True)
for r in rows[:40]:
    print("%.2f s  %5d  %s  %s" % r)
