"""Store benchmark: batched k=8 adapter fetches, microlora's LMDB store vs one safetensors file
per adapter (how PEFT users keep adapters), side by side in one run.

    python benchmarks/store_bench.py [--quick] --out results/store.json

Both layouts hold the same synthetic rank-2 bf16 adapters with the default model's default
target shapes. A fetch picks k random atoms and ends with the tensors the kernel consumes (the
atoms composed into one rank-k*r adapter per module, checked equal on both sides), so both do
the same final work; each side takes its natural route there (the store: zero-copy views of
packed adapters, composed with one copy; the files: ``load_file`` per adapter, then each
module's factors concatenated along the rank).
Fetches run in ABBA blocks (store, files, files, store), each layout fetching every random
pick once, so page-cache state and drift hit both alike without one polluting the other's
CPU caches mid-fetch.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from microlora.core.config import TargetSpec
from microlora.core.models import default_model_dir, ensure_default_model
from microlora.core.pack import Packed, compose
from microlora.core.paths import dir_bytes
from microlora.core.targets import select_targets
from store import AdapterStore, AtomRecord, StoreHeader
from store.peft import write_peft

RANK = 2
EMBED_DIM = 384
PEFT_KEY = "base_model.model.{}.lora_{}.weight"


def default_target_shapes() -> dict[str, tuple[int, int]]:
    """(in, out) of every default target of the default model, from its config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ensure_default_model()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(default_model_dir()))
    return {name: (m.in_features, m.out_features)
            for name, m in select_targets(model, TargetSpec()).items()}


def synthetic_atoms(n: int, shapes, seed: int, batch: int, std: float = 1.0,
                    dim: int = EMBED_DIM):
    """Batches of random atoms (``dim``-d embeddings); bf16 like a compiled store."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        recs = []
        for i in range(start, min(n, start + batch)):
            adapter = Packed.of({name: ((torch.randn(RANK, d_in, generator=g) * std),
                                        (torch.randn(d_out, RANK, generator=g) * std))
                                 for name, (d_in, d_out) in shapes.items()}, torch.bfloat16)
            emb = torch.randn(dim, generator=g)
            recs.append(AtomRecord(id=f"{i:012x}", text=f"synthetic atom {i}", adapter=adapter,
                                   embedding=(emb / emb.norm()).numpy(), base_fingerprint="bench",
                                   source="synthetic", config={"rank": RANK, "scale": 1.0}))
        yield recs


def write_peft_dir(root: Path, rec: AtomRecord) -> None:
    """The baseline's layout: one PEFT LoRA folder per atom (microlora's own PEFT writer)."""
    write_peft(root / rec.id, rec.adapter.unpack())


def fetch_store(store: AdapterStore, ids: list[str]):
    with store.read("bench") as reader:
        records = reader.gather(ids)  # zero-copy views into the memory map
        return compose([[r.adapter for r in records]], dtype=torch.bfloat16)  # the one copy


def fetch_files(root: Path, ids: list[str], names: list[str]):
    atoms = []
    for i in ids:
        t = load_file(root / i / "adapter_model.safetensors")
        atoms.append({n: (t[PEFT_KEY.format(n, "A")], t[PEFT_KEY.format(n, "B")]) for n in names})
    # what a user of PEFT files does: concatenate each module's factors along the rank
    return {n: (torch.cat([a[n][0] for a in atoms])[None], torch.cat([a[n][1] for a in atoms],
                                                                       1)[None]) for n in names}


def write_results(result: dict, out: Path, machine: str) -> None:
    """Stamp the machine, write the JSON, and print the numbers (every benchmark ends so)."""
    result["machine"] = machine
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key:>34}: {value:.4f}" if isinstance(value, float) else f"{key:>34}: {value}")


def torch_machine(model=None) -> str:
    """The machine a result was measured on: its GPU (where the model runs on one) or its
    CPU threads, torch, and the model's dtype."""
    param = next(model.parameters()) if model is not None else torch.empty(0)
    where = torch.cuda.get_device_name(param.device) if param.device.type == "cuda" else \
        f"{torch.get_num_threads()} torch threads"
    dtype = f", {param.dtype}" if model is not None else ""
    return f"{platform.machine()}, {where}, torch {torch.__version__}{dtype}"


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 atoms instead of 100,000")
    ap.add_argument("--atoms", type=int, help="override the number of atoms")
    ap.add_argument("--fetches", type=int, default=2000, help="random fetches per layout")
    ap.add_argument("-k", type=int, default=8, help="atoms per fetch")
    ap.add_argument("--workdir", type=Path, help="where to build both layouts [temp dir]")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    args = ap.parse_args()
    n = args.atoms or (10_000 if args.quick else 100_000)
    torch.set_num_threads(1)  # fetching is latency work; keep the comparison single-threaded

    shapes = default_target_shapes()
    names = list(shapes)
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        header = StoreHeader("bench", "synthetic", "bench-emb", "synthetic", EMBED_DIM)
        store = AdapterStore.create(work / "store", header)
        files = work / "peft"
        files.mkdir()
        t_store = t_files = 0.0
        for recs in tqdm(synthetic_atoms(n, shapes, seed=0, batch=500), total=-(-n // 500),
                         desc="writing", unit="batch"):
            t0 = time.perf_counter()
            store.put("bench", recs)
            t1 = time.perf_counter()
            for r in recs:
                write_peft_dir(files, r)
            t2 = time.perf_counter()
            t_store += t1 - t0
            t_files += t2 - t1
        stats = store.stats()[0]
        disk, files_disk = dir_bytes(work / "store"), dir_bytes(files)

        rng = random.Random(1)
        ids = store.ids("bench")
        picks = [rng.sample(ids, args.k) for _ in range(args.fetches)]
        half = len(picks) // 2
        lat_store, lat_files = [], []
        # ABBA blocks: each layout fetches every pick once, in runs of its own (as a server
        # doing only that would), and both see the same mix of first and repeated touches.
        blocks = [("store", picks[:half]), ("files", picks[:half]), ("files", picks[half:]),
                  ("store", picks[half:])]
        for layout, block in tqdm(blocks, desc="fetching", unit="block"):
            for pick in block:
                t0 = time.perf_counter()
                if layout == "store":
                    fetch_store(store, pick)
                else:
                    fetch_files(files, pick, names)
                (lat_store if layout == "store" else lat_files).append(
                    (time.perf_counter() - t0) * 1e3)
        a, b = fetch_store(store, picks[0]), fetch_files(files, picks[0], names)
        assert all(torch.equal(a[m][0], b[m][0]) and torch.equal(a[m][1], b[m][1]) for m in a)
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "atoms": n, "k": args.k, "rank": RANK, "target_modules": len(shapes),
        "adapter_bytes": sum((i + o) * RANK * 2 for i, o in shapes.values()),
        "bytes_per_atom": disk / n,
        "record_bytes_per_atom": stats.bytes_per_atom,
        "files_bytes_per_atom": files_disk / n,
        "write_atoms_per_s": n / t_store,
        "files_write_atoms_per_s": n / t_files,
        "fetch_k8_p50_ms": percentile(lat_store, 50),
        "fetch_k8_p99_ms": percentile(lat_store, 99),
        "files_fetch_k8_p50_ms": percentile(lat_files, 50),
        "files_fetch_k8_p99_ms": percentile(lat_files, 99),
        "fetch_speedup_vs_files": statistics.median(lat_files) / statistics.median(lat_store),
        "fetch_speedup_vs_files_p99": percentile(lat_files, 99) / percentile(lat_store, 99),
        "fetches": args.fetches,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, "
                   f"torch {torch.__version__}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key:>28}: {value:.3f}" if isinstance(value, float) else f"{key:>28}: {value}")


if __name__ == "__main__":
    main()
