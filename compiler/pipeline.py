"""The compile pipeline: paths -> documents -> atoms -> trained adapters -> the store.

Each batch of atoms is trained, embedded and written in one LMDB transaction, so an
interrupted compile (Ctrl-C, kill -9) leaves a store that verifies clean, and the next run
skips every atom already there: it resumes where it stopped. Atom ids hash the normalised text
with the base-model fingerprint and the recipe, so recompiling unchanged text trains nothing.
"""

from __future__ import annotations

import hashlib
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from compiler.chunking import Atom, chunk_document
from compiler.documents import MAX_FILE_MB, Document, Skipped, read_documents
from compiler.lessons import embedded_text, lesson_views, taught_text, teacher_window
from compiler.trainer import AtomTrainer
from microlora.core.config import ChunkConfig, StoreConfig, TrainConfig
from microlora.core.embedder import Embedder
from microlora.core.errors import QuotaExceededError, StoreError
from microlora.core.models import BaseModel
from microlora.core.pack import Packed
from microlora.core.targets import linear_features, select_targets
from store import (
    AdapterStore,
    AtomRecord,
    BatchDocuments,
    StoreHeader,
    check_document_id,
    is_store,
)
from store.record import adapter_bytes

# Rough throughput for --dry-run estimates before a store has measured its own (atoms/s with
# the default recipe on the default model; measured on 2 CPU cores, see benchmarks/RESULTS.md).
_ASSUMED_ATOMS_PER_S = {"cpu": 0.5, "cuda": 8.0}  # cpu: 0.5-1 at 12 steps; cuda: not measured


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


class Plan(NamedTuple):
    """What compiling some documents will store: their distinct atoms with ids, the documents
    that gave no atom, and a manifest per document (its source -> its atom ids)."""

    atoms: list[PlannedAtom]
    problems: list[Skipped]
    manifests: dict[str, list[str]]


def plan(docs: Sequence[Document], tokenizer, base_fingerprint: str,
         train_config: TrainConfig, chunk_config: ChunkConfig = ChunkConfig()) -> Plan:
    """Chunk the documents and name their atoms (see ``Plan``)."""
    problems: list[Skipped] = []
    seen: dict[str, PlannedAtom] = {}
    manifests: dict[str, list[str]] = {}
    for doc in docs:
        try:
            check_document_id(doc.source)  # before any training, not at its manifest
        except StoreError as e:
            problems.append(Skipped(doc.source, str(e)))
            continue
        atoms = chunk_document(doc, tokenizer, chunk_config)
        if not atoms:
            problems.append(Skipped(doc.source, "no text to compile"))
            continue
        ids = manifests.setdefault(doc.source, [])
        for atom in atoms:
            pid = atom_id(atom, base_fingerprint, train_config)
            seen.setdefault(pid, PlannedAtom(pid, atom))
            ids.append(pid)
    return Plan(list(seen.values()), problems, manifests)


def store_header(base: BaseModel, embedder: Embedder) -> StoreHeader:
    return StoreHeader(base.fingerprint, base.name, embedder.fingerprint, embedder.name,
                       embedder.dim, base_dtype=base.quantization)


@dataclass(frozen=True)
class Quota:
    """Limits on one namespace (a user's personal store); None = unlimited."""

    max_atoms: int | None = None
    max_bytes: int | None = None


def compile_corpus(paths: Sequence[str | Path], store_dir: str | Path, *,
                   max_file_mb: float = MAX_FILE_MB, **kwargs) -> CompileReport:
    """Compile the documents under ``paths`` (files or directories) into the store at
    ``store_dir`` (created if needed); the keyword arguments are ``compile_documents``'s."""
    docs, problems = read_documents(paths, max_file_mb)
    report = compile_documents(docs, store_dir, **kwargs)
    report.problems[:0] = problems
    return report


def compile_documents(
    docs: Sequence[Document],
    store: AdapterStore | str | Path,
    *,
    base: BaseModel,
    embedder: Embedder,
    namespace: str = "default",
    train_config: TrainConfig = TrainConfig(),
    chunk_config: ChunkConfig = ChunkConfig(),
    prune: bool = False,
    dry_run: bool = False,
    quota: Quota = Quota(),
    progress: Callable[[int, int], None] | None = None,
    prepared: Plan | None = None,
    check: Callable[[], None] | None = None,
    store_config: StoreConfig = StoreConfig(),
) -> CompileReport:
    """Compile documents into ``namespace`` of ``store`` (an open, writable store, or a
    directory: opened, or created, and closed again).

    ``progress(done, total)`` is called after every batch. With ``prune``, atoms and document
    manifests of the namespace that these documents no longer produce are removed. A
    ``quota`` that the namespace would exceed fails before anything is trained. ``prepared``:
    the documents' ``plan`` when the caller made it already (with the same configs), so a
    large upload is chunked once, not again here. ``check()`` runs before each batch is
    trained and inside the transaction that writes it; what it raises stops the compile
    (a server job, cancelled). ``store_config``: how a store opened here keeps adapters.
    """
    report = CompileReport(documents=len(docs))
    if prepared is None:
        prepared = plan(docs, base.tokenizer, base.fingerprint, train_config, chunk_config)
    planned, manifests = prepared.atoms, prepared.manifests
    report.problems = list(prepared.problems)
    report.atoms = len(planned)
    with _opened(store, base, embedder, create=bool(planned) and not dry_run,
                 readonly=dry_run, adapter_dtype=store_config.adapter_dtype) as store:
        if dry_run:
            existing = set(store.ids(namespace)) if store is not None and \
                namespace in store.namespaces() else set()
            report.planned = [p for p in planned if p.id not in existing]
            report.already_compiled = len(planned) - len(report.planned)
            report.estimated_seconds = len(report.planned) / _ASSUMED_ATOMS_PER_S.get(
                base.device.type, 1.0)
            return report
        if store is None or not (planned or prune):
            return report  # nothing to train, prune or record
        check_quota(store, namespace, planned, base, train_config, quota)
        # which atoms are stored, and the manifests of the documents that have one, in one
        # transaction: a document forgotten meanwhile cannot take an atom these count on
        present = store.claim_documents(namespace, manifests)
        todo = [p for p in planned if p.id not in (present or ())]
        report.already_compiled = len(planned) - len(todo)
        t0 = time.perf_counter()
        losses = train_atoms(todo, store, store, base=base, embedder=embedder,
                             namespace=namespace, train_config=train_config,
                             chunk_config=chunk_config, report=report, progress=progress,
                             manifests=manifests, create=present is None, check=check,
                             claimed=[d for d, ids in manifests.items()
                                      if present and present.intersection(ids)])
        if prune:
            prune_namespace(store, namespace, planned, manifests, report)
        report.seconds = time.perf_counter() - t0
    if losses:
        report.mean_final_loss = sum(losses) / len(losses)
    return report


def prune_namespace(store: AdapterStore, namespace: str, planned: Sequence[PlannedAtom],
                    manifests: dict[str, list[str]], report: CompileReport) -> None:
    """Drop the atoms and documents of the namespace that the corpus no longer produces.
    (Manifests are written with the atoms, batch by batch: ``train_atoms``.)"""
    if namespace not in store.namespaces():
        return
    keep = {p.id for p in planned}
    report.pruned = store.delete(namespace, [i for i in store.ids(namespace) if i not in keep])
    for doc_id in set(store.documents(namespace)) - set(manifests):
        store.delete_document(namespace, doc_id)


@contextmanager
def _opened(store: AdapterStore | str | Path, base: BaseModel, embedder: Embedder, *,
            create: bool, readonly: bool, adapter_dtype: str) -> Iterator[AdapterStore | None]:
    """An open store checked against the models: the caller's (left open), or the one at a
    path (created only if ``create``; None when there is none), closed afterwards."""
    if isinstance(store, AdapterStore):
        store.check_compatible(base.fingerprint, embedder.fingerprint, base_name=base.name,
                               embedder_name=embedder.name)
        store.check_base_dtype(base.base_dtype, strict=True)
        yield store
        return
    path = Path(store)
    if not is_store(path) and not create:
        yield None
        return
    with AdapterStore.open_or_create(path, store_header(base, embedder), readonly=readonly,
                                     adapter_dtype=adapter_dtype) as opened:
        yield opened


def batches(todo: Sequence[PlannedAtom], size: int) -> list[list[PlannedAtom]]:
    """The training batches, in order: what each atom is trained beside (and so its adapter)
    depends on this split, which is the same however many processes share the work. As few
    batches of at most ``size`` as fit, their sizes within one of each other: a short last
    batch (20 atoms as 16 + 4) trains each of its atoms beside the same few others at every
    step, and they learn to lean on them (compile_bench: alone losses up to 36)."""
    count = -(-len(todo) // size)
    return [list(todo[i * len(todo) // count:(i + 1) * len(todo) // count])
            for i in range(count)]


def train_atoms(todo: Sequence[PlannedAtom], store: AdapterStore, out: AdapterStore, *,
                base: BaseModel, embedder: Embedder, namespace: str, train_config: TrainConfig,
                chunk_config: ChunkConfig, report: CompileReport, share: slice = slice(None),
                progress: Callable[[int, int], None] | None = None,
                manifests: dict[str, list[str]] | None = None, claimed: Iterable[str] = (),
                create: bool = True, check: Callable[[], None] | None = None) -> list[float]:
    """Train the batches ``share`` of ``todo`` (all by default; ``slice(rank, None, world)``
    for one of several processes) and write them to ``out``, a batch per transaction.

    Each batch's transaction also writes the ``manifests`` of the documents whose first
    atom in ``out`` it holds (``claimed``: those whose manifests ``out`` has already, from
    ``claim_documents``). ``create``: whether the first batch may create the namespace (the
    later ones never do); ``check``: as ``compile_documents``'.

    Each atom's frozen store neighbours are looked up in ``store`` before anything is trained,
    so they are the atoms stored *before* this compile: an atom's adapter depends on its batch
    and that snapshot only, never on which process trained which batch first. Returns the
    final losses; counts go into ``report``."""
    mine = batches(todo, train_config.batch_atoms)[share]
    if not mine:
        return []
    atoms = [p for batch in mine for p in batch]
    taught = {p.id: taught_text(p.atom, train_config) for p in atoms}
    vectors = embedder.encode([embedded_text(p.atom, train_config) for p in atoms])
    neighbour_ids = _snapshot_neighbours(store, namespace, vectors, train_config)
    owners: dict[str, list[str]] = {}  # atom id -> the documents that have it
    for doc_id, ids in (manifests or {}).items():
        for i in ids:
            owners.setdefault(i, []).append(doc_id)
    registered = set(claimed)
    losses: list[float] = []
    with AtomTrainer(base.model, base.tokenizer, train_config) as trainer:
        start = 0
        for batch in mine:
            rows = slice(start, start + len(batch))
            start += len(batch)
            if check is not None:
                check()
            neighbours = None if neighbour_ids is None else \
                _stored_adapters(store, namespace, neighbour_ids[rows])
            contexts = ([f"{p.atom.title}\n" if p.atom.title else "" for p in batch]
                        if train_config.title_context else None)
            views = ([lesson_views(p.atom, train_config) for p in batch]
                     if train_config.qa_views else None)
            windows = ([teacher_window(p.atom, train_config, base.tokenizer) for p in batch]
                       if train_config.distill else None)
            company = nearest_company(vectors[rows], train_config.neighbours) \
                if train_config.company == "nearest" else None
            trained = trainer.train([taught[p.id] for p in batch], [p.id for p in batch],
                                    contexts=contexts, frozen_neighbours=neighbours, views=views,
                                    windows=windows, company=company)
            touched = {d for p in batch for d in owners.get(p.id, ())}
            documents = BatchDocuments({d: manifests[d] for d in touched},
                                       frozenset(touched - registered)) if manifests else None
            registered |= touched
            out.put(namespace, [
                AtomRecord(id=p.id, text=p.atom.text, adapter=t.adapter,
                           embedding=vectors[rows][i], base_fingerprint=base.fingerprint,
                           source=p.atom.source, start=p.atom.start, end=p.atom.end,
                           context=list(p.atom.context), context_at=p.atom.at,
                           page=p.atom.page, section=list(p.atom.section),
                           config={**asdict(train_config), **asdict(chunk_config)},
                           extra={"title": p.atom.title, "steps": t.steps,
                                  "final_loss": t.final_loss})
                for i, (p, t) in enumerate(zip(batch, trained))],
                documents=documents, create=create, check=check)
            create = False  # the namespace exists now: if it goes, it stays gone
            report.trained += len(batch)
            report.atom_steps += sum(t.steps for t in trained)
            losses += [t.final_loss for t in trained]
            if progress:
                progress(report.trained, len(atoms))
    return losses


def nearest_company(vectors, m: int) -> torch.Tensor:
    """For each atom of a batch, the indices of its ``m`` most similar batch-mates (cosine of
    unit vectors), most similar first: (n, min(m, n - 1))."""
    sims = torch.from_numpy(vectors @ vectors.T)
    sims.fill_diagonal_(-float("inf"))
    return sims.topk(min(m, len(vectors) - 1), dim=1).indices


def check_quota(store: AdapterStore, namespace: str, atoms: Sequence[PlannedAtom],
                base: BaseModel, config: TrainConfig, quota: Quota) -> None:
    """Raise ``QuotaExceededError`` if storing ``atoms`` (those not stored yet) would take the
    namespace past its quota; called before anything is trained. Bytes are estimated from the
    adapter shapes (rank x (in + out) values per target, as the store keeps them) plus text
    and embedding."""
    if quota.max_atoms is None and quota.max_bytes is None:
        return
    have_ids = set(store.ids(namespace)) if namespace in store.namespaces() else set()
    todo = [p for p in {p.id: p for p in atoms}.values() if p.id not in have_ids]
    if not todo:
        return
    have = len(have_ids)
    if quota.max_atoms is not None and have + len(todo) > quota.max_atoms:
        raise QuotaExceededError(
            f"namespace {namespace!r} would hold {have + len(todo)} atoms, over its quota of "
            f"{quota.max_atoms} ({have} stored, {len(todo)} new); delete documents first")
    if quota.max_bytes is not None:
        targets = select_targets(base.model, config.targets).values()
        per_atom = adapter_bytes(config.rank * sum(sum(linear_features(m)) for m in targets),
                                 2 * config.rank * len(targets), store.adapter_dtype)
        stored = next((s.bytes for s in store.stats() if s.namespace == namespace), 0)
        new = sum(per_atom + len(p.atom.text.encode()) + 4 * store.header.embedding_dim
                  for p in todo)
        if stored + new > quota.max_bytes:
            raise QuotaExceededError(
                f"namespace {namespace!r} would take about {(stored + new) / 2**20:.2f} MiB, "
                f"over its quota of {quota.max_bytes / 2**20:.2f} MiB; delete documents first")


def _snapshot_neighbours(store: AdapterStore, namespace: str, vectors, config: TrainConfig
                         ) -> list[list[str]] | None:
    """The ids of the stored atoms most similar to each new atom: its likely company at query
    time. None while the namespace is empty (or neighbours are off)."""
    m = config.neighbours
    if m == 0 or namespace not in store.namespaces() or store.count(namespace) == 0:
        return None
    return [[atom_id for atom_id, _ in row] for row in store.search(namespace, vectors, m)]


def _stored_adapters(store: AdapterStore, namespace: str, ids: Sequence[Sequence[str]]
                     ) -> list[list[Packed]]:
    """The adapters of ``ids`` (one list per atom), copied out of the store."""
    with store.read(namespace) as reader:
        return [[r.adapter for r in reader.gather([i for i in row if i in reader], copy=True)]
                for row in ids]
