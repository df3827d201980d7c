"""Time each stage of a k=8 fetch in process (stop 39's A/B of the fetch path).

    PYTHONPATH=<checkout> python benchmarks/results/stop39/fetch_stages.py [ATOMS]

Writes ATOMS (2,000) int8 atoms with a compiled atom's metadata into a fresh store, waits for
the background checksum pass, then times 3,000 k=8 fetches composed into bf16 (twice; the
second pass is reported): opening the read transaction, getting the 8 values, parsing them,
building the records (dequantizing) and composing them.
"""

import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from store_bench import EMBED_DIM, default_target_shapes, synthetic_atoms  # noqa: E402

from microlora.core.pack import compose  # noqa: E402
from microlora.core.targets import TargetSpec  # noqa: E402
from store import record as rec  # noqa: E402
from store.adapter_store import AdapterStore  # noqa: E402
from store.header import StoreHeader  # noqa: E402

STAGES = ("open", "get", "parse", "build", "compose", "total")


def main() -> None:
    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    shapes = default_target_shapes(TargetSpec())
    header = StoreHeader("bench", "synthetic", "bench-emb", "synthetic", EMBED_DIM)
    with tempfile.TemporaryDirectory() as work, AdapterStore.create(
            Path(work) / "s", header, adapter_dtype="int8", background_verify=True) as store:
        for recs in synthetic_atoms(n, shapes, seed=0, batch=500, rank=1, metadata="compiled"):
            store.put("bench", recs)
        store.verify_in_background(["bench"])
        store.wait_verified()
        ids, rng = store.ids("bench"), random.Random(1)
        picks = [rng.sample(ids, 8) for _ in range(3000)]
        times: dict[str, list[float]] = {}
        for _ in range(2):
            times = {stage: [] for stage in STAGES}
            for pick in picks:
                t = [time.perf_counter()]
                with store.read("bench") as reader:
                    t.append(time.perf_counter())
                    values = [reader._value(i) for i in pick]
                    t.append(time.perf_counter())
                    parsed = [reader._checked(i, v, True) for i, v in zip(pick, values)]
                    t.append(time.perf_counter())
                    records = rec.build(parsed, copy=False)
                    t.append(time.perf_counter())
                    compose([[r.adapter for r in records]], dtype=torch.bfloat16)
                    t.append(time.perf_counter())
                t.append(time.perf_counter())
                for stage, a, b in zip(STAGES[:-1], t, t[1:]):
                    times[stage].append((b - a) * 1e6)
                times["total"].append((t[-1] - t[0]) * 1e6)
    for stage, xs in times.items():
        xs.sort()
        print(f"{stage:8s} p50 {xs[len(xs) // 2]:7.1f} p99 {xs[int(len(xs) * .99)]:7.1f} us")


if __name__ == "__main__":
    main()
