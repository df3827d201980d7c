"""The compile pipeline: paths -> documents -> atoms -> trained adapters -> the store.

Each batch of atoms is trained, embedded and written in one LMDB transaction, so an
interrupted compile (Ctrl-C, kill -9) leaves a store that verifies clean, and the next run
skips every atom already there: it resumes where it stopped. Atom ids hash the normalised text
with the base-model fingerprint and the recipe, so recompiling unchanged text trains nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compiler.chunking import Atom, ChunkConfig, chunk_document
from compiler.documents import MAX_FILE_MB, Skipped, read_documents
from compiler.trainer import AtomTrainer, TrainConfig
from microlora.embedder import Embedder
from microlora.models import BaseModel
from store import AdapterStore, AtomRecord, StoreHeader

log = logging.getLogger(__name__)

# Rough throughput for --dry-run estimates before a store has measured its own (atoms/s with
# the default recipe on the default model; measured on 2 CPU cores, see benchmarks/RESULTS.md).
_ASSUMED_ATOMS_PER_S = {"cpu": 1.0, "cuda": 20.0}


@dataclass(frozen=True)
class PlannedAtom:
    id: str
    atom: Atom


@dataclass
class CompileReport:
    documents: int = 0
    atoms: int = 0  # distinct atoms in the corpus
    already_compiled: int = 0
    trained: int = 0
    pruned: int = 0
    atom_steps: int = 0
    seconds: float = 0.0
    mean_final_loss: float = float("nan")
    estimated_seconds: float = 0.0  # dry runs
    problems: list[Skipped] = field(default_factory=list)
    planned: list[PlannedAtom] = field(default_factory=list)

    @property
    def atoms_per_s(self) -> float:
        return self.trained / self.seconds if self.seconds else 0.0


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def atom_id(atom: Atom, base_fingerprint: str, config: TrainConfig) -> str:
    """Stable identity: same text, model and recipe -> same id -> stored and trained once."""
    title = normalise(atom.title) if config.title_context else ""
    h = hashlib.sha256("\x00".join([normalise(atom.text), title, base_fingerprint,
                                    config.key()]).encode())
    return h.hexdigest()[:32]


def plan(paths: Sequence[str | Path], tokenizer, base_fingerprint: str,
         train_config: TrainConfig, chunk_config: ChunkConfig = ChunkConfig(),
         max_file_mb: float = MAX_FILE_MB) -> tuple[list[PlannedAtom], list[Skipped], int]:
    """The corpus's distinct atoms with their ids, the inputs that were skipped, and how many
    documents were read."""
    docs, problems = read_documents(paths, max_file_mb)
    seen: dict[str, PlannedAtom] = {}
    for doc in docs:
        atoms = chunk_document(doc, tokenizer, chunk_config)
        if not atoms:
            problems.append(Skipped(doc.source, "no text to compile"))
        for atom in atoms:
            pid = atom_id(atom, base_fingerprint, train_config)
            seen.setdefault(pid, PlannedAtom(pid, atom))
    return list(seen.values()), problems, len(docs)


def store_header(base: BaseModel, embedder: Embedder) -> StoreHeader:
    return StoreHeader(base.fingerprint, base.name, embedder.fingerprint, embedder.name,
                       embedder.dim)


def compile_corpus(
    paths: Sequence[str | Path],
    store_dir: str | Path,
    *,
    base: BaseModel,
    embedder: Embedder,
    namespace: str = "default",
    train_config: TrainConfig = TrainConfig(),
    chunk_config: ChunkConfig = ChunkConfig(),
    prune: bool = False,
    dry_run: bool = False,
    max_file_mb: float = MAX_FILE_MB,
    progress: Callable[[int, int], None] | None = None,
) -> CompileReport:
    """Compile documents into ``namespace`` of the store at ``store_dir`` (created if needed).

    ``progress(done, total)`` is called after every batch. With ``prune``, atoms of the
    namespace that the corpus no longer produces (deleted or edited text) are removed.
    """
    report = CompileReport()
    planned, report.problems, report.documents = plan(
        paths, base.tokenizer, base.fingerprint, train_config, chunk_config, max_file_mb)
    report.atoms = len(planned)
    store_path = Path(store_dir)
    existing: set[str] = set()
    if (store_path / "data.mdb").exists():
        with AdapterStore(store_path, readonly=True) as s:
            s.check_compatible(base.fingerprint, embedder.fingerprint, base_name=base.name,
                               embedder_name=embedder.name)
            if namespace in s.namespaces():
                existing = set(s.ids(namespace))
    todo = [p for p in planned if p.id not in existing]
    report.already_compiled = len(planned) - len(todo)
    if dry_run:
        report.planned = todo
        rate = _ASSUMED_ATOMS_PER_S.get(base.device.type, 1.0)
        report.estimated_seconds = len(todo) / rate
        return report

    if not todo and not (prune and existing):
        return report  # nothing to train or prune: do not create or touch a store
    t0 = time.perf_counter()
    losses: list[float] = []
    with AdapterStore.open_or_create(store_path, store_header(base, embedder)) as store, \
            AtomTrainer(base.model, base.tokenizer, train_config) as trainer:
        size = train_config.batch_atoms
        for start in range(0, len(todo), size):
            batch = todo[start:start + size]
            texts = [p.atom.text for p in batch]
            vectors = embedder.encode(texts)
            neighbours = _store_neighbours(store, namespace, vectors, train_config)
            contexts = ([f"{p.atom.title}\n" if p.atom.title else "" for p in batch]
                        if train_config.title_context else None)
            trained = trainer.train(texts, [p.id for p in batch], contexts=contexts,
                                    frozen_neighbours=neighbours)
            store.put(namespace, [
                AtomRecord(id=p.id, text=p.atom.text,
                           adapter=_with_scale(t.adapter, train_config.scale), embedding=vectors[i],
                           base_fingerprint=base.fingerprint, source=p.atom.source,
                           start=p.atom.start, end=p.atom.end,
                           config={**asdict(train_config), **asdict(chunk_config)},
                           extra={"title": p.atom.title, "steps": t.steps,
                                  "final_loss": t.final_loss})
                for i, (p, t) in enumerate(zip(batch, trained))])
            report.trained += len(batch)
            report.atom_steps += sum(t.steps for t in trained)
            losses += [t.final_loss for t in trained]
            if progress:
                progress(report.trained, len(todo))
        if prune and namespace in store.namespaces():
            keep = {p.id for p in planned}
            report.pruned = store.delete(namespace, [i for i in store.ids(namespace)
                                                     if i not in keep])
    report.seconds = time.perf_counter() - t0
    if losses:
        report.mean_final_loss = sum(losses) / len(losses)
    return report


def _with_scale(adapter, scale: float):
    """Stored adapters carry their scale in B (delta = B A), so composing atoms of different
    recipes, or exporting them, needs no per-atom scale."""
    return adapter if scale == 1.0 else {k: (A, B * scale) for k, (A, B) in adapter.items()}


def _store_neighbours(store: AdapterStore, namespace: str, vectors, config: TrainConfig):
    """The stored atoms most similar to each new atom: its likely company at query time,
    composed (frozen) beside it while it trains, in the trainer's convention (the trainer
    applies the scale). None while the namespace is empty."""
    m = config.neighbours
    if m == 0 or namespace not in store.namespaces() or store.count(namespace) == 0:
        return None
    hits = store.search(namespace, vectors, m)
    with store.read(namespace) as reader:
        return [[_with_scale(reader.get(atom_id, copy=True).adapter, 1 / config.scale)
                 for atom_id, _ in row] for row in hits]
