"""scale_bench on one kept store, FAISS searching on one thread (as store/index.py now does) or
on all (as before); run from the repository root, one mode at a time, alternating:

    python benchmarks/results/stop35/scale_modes.py one|all|torch1 ATOMS OUT.json

torch1: torch on one thread as well (the first, import-time version of the change).
"""

import contextlib
import sys

import torch

import store.index

sys.path.insert(0, "benchmarks")
import scale_bench  # noqa: E402

mode, atoms, out = sys.argv[1:4]
if mode == "all":
    store.index._one_thread = contextlib.nullcontext
elif mode == "torch1":
    torch.set_num_threads(1)
sys.argv = ["scale_bench.py", "--atoms", atoms, "--queries", "400",
            "--store", f"scale_store_{atoms}", "--out", out]
scale_bench.main()
