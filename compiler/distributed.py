"""Compiling on several processes or machines with ``torch.distributed`` (launched by torchrun).

    torchrun --nproc-per-node 4 -m microlora compile docs/ --store kb
    # two machines: the same command on each, with --nnodes 2 --node-rank R
    #   --rdzv-backend c10d --rdzv-endpoint HOST:29500, and the store on a shared filesystem

Every rank reads and plans the same corpus, so all agree on the atoms and their batches without
exchanging them. Rank r trains batches r, r+W, r+2W, ... (W processes) and writes each batch,
one transaction at a time, to its own shard ``<store>/shards/rank-<r>`` (a small store: an
interrupted run keeps what it finished, manifests included). After a barrier, rank 0 merges the
shards into the store (each shard's document manifests with its first atoms), rebuilds the
index, and deletes the shards; a run that was interrupted merges the shards it left behind
first. Because every atom's stored neighbours come from the store as it was before the compile
(``train_atoms``), the adapters equal those of a one-process compile. The process group is
gloo on CPU, NCCL on GPU (only barriers pass through it), and each rank uses
``cuda:LOCAL_RANK`` where there are GPUs.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from compiler.documents import MAX_FILE_MB, read_documents
from compiler.pipeline import (
    CompileReport,
    plan,
    prune_namespace,
    store_header,
    train_atoms,
)
from microlora.core.config import ChunkConfig, StoreConfig, TrainConfig
from microlora.core.embedder import Embedder
from microlora.core.models import BaseModel
from store import AdapterStore, BatchDocuments, is_store


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Ranks | None:
        """The ranks torchrun set in the environment, or None for a plain single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, requested: str | None) -> str:
        if requested is not None:
            return requested
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"


def compile_distributed(paths: Sequence[str | Path], store_dir: str | Path, ranks: Ranks, *,
                        base: BaseModel, embedder: Embedder, namespace: str = "default",
                        train_config: TrainConfig = TrainConfig(),
                        chunk_config: ChunkConfig = ChunkConfig(), prune: bool = False,
                        max_file_mb: float = MAX_FILE_MB,
                        progress: Callable[[int, int], None] | None = None,
                        store_config: StoreConfig = StoreConfig()) -> CompileReport | None:
    """This rank's part of a distributed compile; rank 0 returns the whole run's report,
    the other ranks None. The shards and the store keep adapters as ``store_config`` says
    (int8 shards merged into the store give the same bytes: ``store/quantize.py``)."""
    backend = "nccl" if base.device.type == "cuda" else "gloo"
    if base.device.type == "cuda":
        torch.cuda.set_device(base.device)
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world)
    try:
        return _compile(paths, Path(store_dir), ranks, base, embedder, namespace, train_config,
                        chunk_config, prune, max_file_mb, progress, store_config.adapter_dtype)
    finally:
        dist.destroy_process_group()


def _compile(paths, store_dir: Path, ranks: Ranks, base, embedder, namespace, train_config,
             chunk_config, prune, max_file_mb, progress, adapter_dtype: str
             ) -> CompileReport | None:
    t0 = time.perf_counter()
    docs, problems = read_documents(paths, max_file_mb)
    report = CompileReport(documents=len(docs))
    planned, report.problems, manifests = plan(docs, base.tokenizer, base.fingerprint,
                                               train_config, chunk_config)
    report.problems[:0] = problems
    report.atoms = len(planned)
    if ranks.rank == 0:  # the store exists, and holds what an interrupted run left, first
        with AdapterStore.open_or_create(store_dir, store_header(base, embedder),
                                         adapter_dtype=adapter_dtype) as store:
            merge_shards(store)
            store.claim_documents(namespace, manifests)
    dist.barrier()
    with AdapterStore(store_dir, readonly=True) as store:
        store.check_compatible(base.fingerprint, embedder.fingerprint, base_name=base.name,
                               embedder_name=embedder.name)
        store.check_base_dtype(base.base_dtype, strict=True)
        existing = set(store.ids(namespace)) if namespace in store.namespaces() else set()
        todo = [p for p in planned if p.id not in existing]
        with AdapterStore.open_or_create(store.layout.shard(ranks.rank), store.header,
                                         adapter_dtype=adapter_dtype) as out:
            losses = train_atoms(todo, store, out, base=base, embedder=embedder,
                                 namespace=namespace, train_config=train_config,
                                 chunk_config=chunk_config, report=report,
                                 share=slice(ranks.rank, None, ranks.world), progress=progress,
                                 manifests=manifests)
    dist.barrier()  # every shard is complete
    if ranks.rank != 0:
        return None
    report.already_compiled = len(planned) - len(todo)
    with AdapterStore(store_dir, adapter_dtype=adapter_dtype) as store:
        report.trained = merge_shards(store)
        if prune:
            prune_namespace(store, namespace, planned, manifests, report)
        if namespace in store.namespaces():
            store.index(namespace)  # rebuilt once, here, and saved
    report.seconds = time.perf_counter() - t0
    if losses:  # rank 0's share: the other ranks' losses stay in their atoms' records
        report.mean_final_loss = sum(losses) / len(losses)
    return report


def merge_shards(store: AdapterStore, batch: int = 256) -> int:
    """Move every atom from ``<store>/shards/*`` into ``store`` (atoms it already holds are
    kept as they are), the shards' manifests with their first atoms, and delete the shards;
    returns how many atoms were moved."""
    moved = 0
    for shard_dir in store.layout.shards():
        if is_store(shard_dir):
            with AdapterStore(shard_dir, readonly=True) as shard:
                for ns in shard.namespaces():
                    ids, manifests = shard.ids(ns), shard.documents(ns)
                    for start in range(0, len(ids), batch):
                        documents = BatchDocuments(manifests, frozenset(manifests)) \
                            if start == 0 else None
                        moved += store.put(ns, shard.get(ns, ids[start:start + batch]),
                                           documents=documents)
        shutil.rmtree(shard_dir)
    if store.layout.shards_dir.is_dir():
        store.layout.shards_dir.rmdir()
    return moved
