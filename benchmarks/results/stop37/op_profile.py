"""Op-level profile (torch.profiler) of compile_bench's --quick compile: where the CPU time
goes, by operation, and the matmuls by shape. Run from the repository root:

    python benchmarks/results/stop37/op_profile.py > op_profile.txt

(`op_profile_quick_bf16.txt` beside it ran while the default base dtype was bf16; today's
default, "auto", loads fp32 on a CPU without AMX.)
"""

import argparse
import sys
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "benchmarks")
from compile_bench import models_and_corpus, train_microlora  # noqa: E402

from microlora.core.config import TrainConfig  # noqa: E402

args = argparse.Namespace(quick=True, atoms=None, base_model=None, embedder=None, device=None,
                          base_dtype="auto")
base, embedder, docs = models_and_corpus(args)
with tempfile.TemporaryDirectory() as tmp:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _, seconds, report = train_microlora(base, embedder, docs, TrainConfig(), Path(tmp) / "s")
print("seconds", seconds, "atom_steps", report.atom_steps)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
rows = sorted(((e.self_cpu_time_total / 1e6, e.count, e.key, str(e.input_shapes)[:120])
               for e in prof.key_averages(group_by_input_shape=True)
               if e.key in ("aten::mm", "aten::bmm", "aten::addmm")), reverse=True)
for seconds, count, key, shapes in rows[:40]:
    print(f"{seconds:.2f} s  {count:5d}  {key}  {shapes}")
