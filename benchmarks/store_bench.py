"""Store benchmark: batched k=8 adapter fetches, microlora's LMDB store (one per adapter
storage: int8 and bf16 by default) vs one safetensors file per adapter (how PEFT users keep
adapters), side by side in one run.

    python benchmarks/store_bench.py [--quick] [--formats int8,bf16] --out results/store.json

Every layout holds the same synthetic adapters of the default rank (bf16 values) with the
default model's default target shapes (``--rank``, ``--last-layers`` for other recipes). A
fetch picks k random atoms and ends with the tensors the kernel consumes (the atoms composed
into one rank-k*r adapter per module, in ``--compose-dtype``), so all do the same final work;
each takes its natural route there (a bf16 store: zero-copy views of packed adapters, composed
with one copy; an int8 store: each atom dequantized, then composed; the files: ``load_file``
per adapter, then each module's factors concatenated along the rank). The bf16 store and the
files are checked equal; int8 within its scales. Fetches run in mirrored blocks (A B C, then C
B A), each layout fetching every random pick once, so page-cache state and drift hit all alike
without one polluting another's CPU caches mid-fetch. ``--metadata compiled`` gives each atom
what a compiled one carries beside its adapter (the recipe, a paragraph of context, a 64-hex
id): the default keeps the short synthetic text the earlier results used.
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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from microlora.core.config import ChunkConfig, TargetSpec, TrainConfig
from microlora.core.models import default_model_dir, ensure_default_model
from microlora.core.pack import Packed, compose
from microlora.core.paths import dir_bytes
from microlora.core.targets import blocks_dtype, select_targets
from store import AdapterStore, AtomRecord, StoreHeader
from store.peft import write_peft

RANK = TrainConfig.rank  # the default recipe's
EMBED_DIM = 384
# what a compiled atom carries beside its adapter (``--metadata compiled``): its recipe as
# compile_documents records it, and a paragraph of context around a sentence of typical length
_SENTENCE = "The town of Lisk lies on the river Carrow, forty miles north of the coast."
_CONTEXT = [_SENTENCE] * 5
PEFT_KEY = "base_model.model.{}.lora_{}.weight"


def default_target_shapes(targets: TargetSpec = TargetSpec()) -> dict[str, tuple[int, int]]:
    """(in, out) of every target of the default model, from its config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ensure_default_model()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(default_model_dir()))
    return {name: (m.in_features, m.out_features)
            for name, m in select_targets(model, targets).items()}


def synthetic_atoms(n: int, shapes, seed: int, batch: int, std: float = 1.0,
                    dim: int = EMBED_DIM, rank: int = RANK, metadata: str = "synthetic"):
    """Batches of random atoms (``dim``-d embeddings), bf16 values; ``metadata="compiled"``
    gives them a compiled atom's recipe, context and id length."""
    g = torch.Generator().manual_seed(seed)
    compiled = {**asdict(TrainConfig(rank=rank)), **asdict(ChunkConfig())}
    for start in range(0, n, batch):
        recs = []
        for i in range(start, min(n, start + batch)):
            adapter = Packed.of({name: ((torch.randn(rank, d_in, generator=g) * std),
                                        (torch.randn(d_out, rank, generator=g) * std))
                                 for name, (d_in, d_out) in shapes.items()}, torch.bfloat16)
            emb = torch.randn(dim, generator=g)
            common = dict(adapter=adapter, embedding=(emb / emb.norm()).numpy(),
                          base_fingerprint="bench")
            if metadata == "compiled":
                recs.append(AtomRecord(
                    id=f"{i:064x}", text=_SENTENCE, source="docs/passage-0001.md", start=120,
                    end=120 + len(_SENTENCE), context=_CONTEXT, context_at=2, config=compiled,
                    extra={"title": "Lisk", "steps": 17, "final_loss": 0.0123}, **common))
            else:
                recs.append(AtomRecord(id=f"{i:012x}", text=f"synthetic atom {i}",
                                       source="synthetic", config={"rank": rank, "scale": 1.0},
                                       **common))
        yield recs


def write_peft_dir(root: Path, rec: AtomRecord) -> None:
    """The baseline's layout: one PEFT LoRA folder per atom (microlora's own PEFT writer)."""
    write_peft(root / rec.id, rec.adapter.unpack())


def fetch_store(store: AdapterStore, ids: list[str], dtype: torch.dtype = torch.bfloat16):
    with store.read("bench") as reader:
        records = reader.gather(ids)  # bf16: zero-copy views into the map; int8: dequantized
        return compose([[r.adapter for r in records]], dtype=dtype)  # one copy


def fetch_files(root: Path, ids: list[str], names: list[str],
                dtype: torch.dtype = torch.bfloat16):
    atoms = []
    for i in ids:
        t = load_file(root / i / "adapter_model.safetensors")
        atoms.append({n: (t[PEFT_KEY.format(n, "A")], t[PEFT_KEY.format(n, "B")]) for n in names})
    # what a user of PEFT files does: concatenate each module's factors along the rank
    return {n: (torch.cat([a[n][0] for a in atoms])[None].to(dtype),
                torch.cat([a[n][1] for a in atoms], 1)[None].to(dtype)) for n in names}


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
    dtype = f", {blocks_dtype(model)}" if model is not None else ""  # the vocabulary's may differ
    return f"{platform.machine()}, {where}, torch {torch.__version__}{dtype}"


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 atoms instead of 100,000")
    ap.add_argument("--atoms", type=int, help="override the number of atoms")
    ap.add_argument("--fetches", type=int, default=2000, help="random fetches per layout")
    ap.add_argument("-k", type=int, default=8, help="atoms per fetch")
    ap.add_argument("--formats", default="int8,bf16",
                    help="adapter storages, one store each (the first is reported as the "
                         "store's headline numbers)")
    ap.add_argument("--no-files", action="store_true", help="leave out the PEFT files")
    ap.add_argument("--rank", type=int, default=RANK)
    ap.add_argument("--last-layers", type=int, default=TargetSpec().last_layers)
    ap.add_argument("--metadata", choices=["synthetic", "compiled"], default="synthetic")
    ap.add_argument("--compose-dtype", choices=["bf16", "fp32"], default="bf16",
                    help="what a fetch composes into (the kernel's dtype: bf16 on GPU, fp32 "
                         "for the CPU model)")
    ap.add_argument("--warm", action="store_true",
                    help="read every atom once before timing (its checksum verified, its pages "
                         "mapped), as a long-running server will have")
    ap.add_argument("--background-verify", action="store_true",
                    help="open the stores as a server does (StoreConfig.background_verify) "
                         "and let its thread hash every record before timing (the steady "
                         "state a server reaches; background_verify_s: how long the pass took)")
    ap.add_argument("--workdir", type=Path, help="where to build the layouts [temp dir]")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    args = ap.parse_args()
    n = args.atoms or (10_000 if args.quick else 100_000)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.compose_dtype]
    torch.set_num_threads(1)  # fetching is latency work; keep the comparison single-threaded

    shapes = default_target_shapes(TargetSpec(last_layers=args.last_layers))
    names = list(shapes)
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        header = StoreHeader("bench", "synthetic", "bench-emb", "synthetic", EMBED_DIM)
        stores = {f: AdapterStore.create(work / f"store-{f}", header, adapter_dtype=f,
                                         background_verify=args.background_verify)
                  for f in formats}
        files = None if args.no_files else work / "peft"
        if files is not None:
            files.mkdir()
        layouts = [*formats] + ([] if files is None else ["files"])
        write_s = dict.fromkeys(layouts, 0.0)
        for recs in tqdm(synthetic_atoms(n, shapes, seed=0, batch=500, rank=args.rank,
                                         metadata=args.metadata),
                         total=-(-n // 500), desc="writing", unit="batch"):
            for layout in layouts:
                t0 = time.perf_counter()
                if layout == "files":
                    for r in recs:
                        write_peft_dir(files, r)
                else:
                    stores[layout].put("bench", recs)
                write_s[layout] += time.perf_counter() - t0
        stats = {f: stores[f].stats()[0] for f in formats}
        disk = {f: dir_bytes(work / f"store-{f}") for f in formats}
        files_disk = 0 if files is None else dir_bytes(files)

        rng = random.Random(1)
        ids = stores[formats[0]].ids("bench")
        verify_s = {}
        for f in formats if args.background_verify else ():
            t0 = time.perf_counter()
            stores[f].verify_in_background(["bench"])
            stores[f].wait_verified()
            verify_s[f] = time.perf_counter() - t0
        if args.warm:
            for f in formats:
                with stores[f].read("bench") as reader:
                    for start in range(0, len(ids), 256):
                        reader.gather(ids[start:start + 256])
        picks = [rng.sample(ids, args.k) for _ in range(args.fetches)]
        half = len(picks) // 2
        lat: dict[str, list[float]] = {layout: [] for layout in layouts}
        # per fetch, how many of its atoms this layout reads for the first time: a store hashes
        # a record's bytes (its checksum) on its first read in a process
        cold: dict[str, list[int]] = {layout: [] for layout in layouts}
        def hashed_before(layout: str) -> bool:  # every record's checksum already checked
            return args.warm or (args.background_verify and layout != "files")
        seen: dict[str, set[str]] = {layout: set(ids) if hashed_before(layout) else set()
                                     for layout in layouts}
        # mirrored blocks (A B C, C B A): each layout fetches every pick once, in runs of its
        # own (as a server doing only that would), and all see the same mix of first and
        # repeated touches
        blocks = [(layout, picks[:half]) for layout in layouts] + \
            [(layout, picks[half:]) for layout in reversed(layouts)]
        for layout, block in tqdm(blocks, desc="fetching", unit="block"):
            for pick in block:
                t0 = time.perf_counter()
                if layout == "files":
                    fetch_files(files, pick, names, dtype)
                else:
                    fetch_store(stores[layout], pick, dtype)
                lat[layout].append((time.perf_counter() - t0) * 1e3)
                cold[layout].append(len(set(pick) - seen[layout]))
                seen[layout].update(pick)
        _check_same(stores, files, picks[0], names, dtype)
        for s in stores.values():
            s.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    values = args.rank * sum(i + o for i, o in shapes.values())
    result = {"atoms": n, "k": args.k, "rank": args.rank, "target_modules": len(shapes),
              "metadata": args.metadata, "compose_dtype": args.compose_dtype,
              "adapter_values": values, "formats": formats,
              "background_verify": args.background_verify,
              "background_verify_s": verify_s.get(formats[0])}
    for f in formats:
        rows = 2 * args.rank * len(shapes)
        per = {"adapter_bytes": values + 2 * rows if f == "int8" else 2 * values,
               "bytes_per_atom": disk[f] / n,
               "record_bytes_per_atom": stats[f].bytes_per_atom,
               "write_atoms_per_s": n / write_s[f],
               "fetch_k8_p50_ms": percentile(lat[f], 50),
               "fetch_k8_p99_ms": percentile(lat[f], 99)}
        warm = [t for t, c in zip(lat[f], cold[f]) if c == 0]
        if warm:  # the fetches whose every atom this store had read (and hashed) before
            per.update({"warm_fetches": len(warm), "warm_fetch_k8_p50_ms": percentile(warm, 50),
                        "warm_fetch_k8_p99_ms": percentile(warm, 99)})
        if files is not None:
            per["fetch_speedup_vs_files"] = statistics.median(lat["files"]) / \
                statistics.median(lat[f])
            per["fetch_speedup_vs_files_p99"] = percentile(lat["files"], 99) / \
                percentile(lat[f], 99)
        if f == formats[0]:
            result.update(per)  # the headline: the first format, under the earlier names
        result.update({f"{f}_{key}": value for key, value in per.items()})
    if files is not None:
        result.update({"files_bytes_per_atom": files_disk / n,
                       "files_write_atoms_per_s": n / write_s["files"],
                       "files_fetch_k8_p50_ms": percentile(lat["files"], 50),
                       "files_fetch_k8_p99_ms": percentile(lat["files"], 99)})
    result["fetches"] = args.fetches
    write_results(result, args.out, f"{platform.machine()}, {torch.get_num_threads()} torch "
                                    f"thread, torch {torch.__version__}")


def _check_same(stores: dict[str, AdapterStore], files: Path | None, pick: list[str],
                names: list[str], dtype: torch.dtype) -> None:
    """Every layout composes the same adapters: bf16 and files bit for bit, int8 within its
    scales (checked loosely here; tests/test_store_int8.py bounds it)."""
    got = {f: fetch_store(s, pick, dtype) for f, s in stores.items()}
    if files is not None:
        got["files"] = fetch_files(files, pick, names, dtype)
    exact = got.get("bf16", got.get("files"))
    if exact is None:
        return
    for f, adapters in got.items():
        for m, (A, B) in adapters.items():
            if f == "int8":
                assert torch.allclose(A.float(), exact[m][0].float(), rtol=0.02, atol=0.02)
                assert torch.allclose(B.float(), exact[m][1].float(), rtol=0.02, atol=0.02)
            else:
                assert torch.equal(A, exact[m][0]) and torch.equal(B, exact[m][1]), f


if __name__ == "__main__":
    main()
