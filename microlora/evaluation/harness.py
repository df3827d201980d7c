"""Compile a dataset's passages into one fresh store, then answer every question with every
system on the same prompt and decoding, and score the answers.

Systems: ``closed_book`` (the base model alone), ``rag`` (the top-k atoms' sentences in the
prompt), ``passage_rag`` (their windows in the prompt: each atom's paragraph around it, what a
user building plain passage RAG would show; the ``context`` mode), ``parametric`` (the top-k
atoms' adapters composed, no text), ``hybrid`` (adapters and windows) and ``oracle`` (the
adapters of the gold passage's atoms only: the ceiling of the parametric path, retrieval taken
out).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from compiler.pipeline import CompileReport, compile_corpus
from composer import Composer, Hit
from composer.retrieval import select
from microlora.core.config import AskConfig, ChunkConfig, Mode, StoreConfig, TrainConfig
from microlora.core.embedder import Embedder
from microlora.core.models import BaseModel
from microlora.evaluation import metrics
from microlora.evaluation.datasets import Dataset, Item
from store import AdapterStore
from store.peft import read_reader

NAMESPACE = "eval"
# each system: how it answers (AskConfig fields over the run's ``EvalConfig.ask``)
SYSTEMS = {"closed_book": {"mode": Mode.NONE},
           "rag": {"mode": Mode.CONTEXT, "window_tokens": 0},
           "passage_rag": {"mode": Mode.CONTEXT},
           "parametric": {"mode": Mode.PARAMETRIC},
           "hybrid": {"mode": Mode.HYBRID},
           "oracle": {"mode": Mode.PARAMETRIC}}
RETRIEVING = ("rag", "passage_rag", "parametric", "hybrid")  # answers that depend on k


@dataclass(frozen=True)
class EvalConfig:
    """k: atoms per question (the composer's default); sweep: more k values to try for the
    retrieving systems; ``ask``: how every system answers (its mode and k set per system);
    the compile recipe is ``train`` and ``chunk``."""

    k: int = AskConfig.k
    sweep: tuple[int, ...] = ()
    systems: tuple[str, ...] = tuple(SYSTEMS)
    batch_size: int = 8
    max_new_tokens: int | None = None  # 24 for questions, 12 for completion probes
    ask: AskConfig = field(default_factory=AskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    store: StoreConfig = field(default_factory=StoreConfig)  # how the compiled store keeps them
    reader: Path | None = None  # a reader folder (`microlora reader train`) to compose too


def run_eval(dataset: Dataset, workdir: str | Path, base: BaseModel, embedder: Embedder,
             config: EvalConfig = EvalConfig(),
             progress: Callable[[str, int, int], None] | None = None
             ) -> tuple[dict, list[dict]]:
    """Returns (the summary, one row per question and system). ``progress(stage, done,
    total)`` reports compiling and answering."""
    unknown = set(config.systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {list(SYSTEMS)}")
    workdir = Path(workdir)
    report = compile_dataset(dataset, workdir, NAMESPACE, base, embedder, config.train,
                             config.chunk, progress, config.store)
    items = dataset.items
    questions = [it.question for it in items]
    max_new = config.max_new_tokens or (24 if dataset.template == "qa" else 12)
    ks = sorted({config.k, *config.sweep})
    summary: dict = {
        "dataset": dataset.name, "data": dataset.source, "n": len(items),
        "passages": len(dataset.passages),
        "distractors": len(dataset.distractors), "k": config.k,
        "base_dtype": base.base_dtype,
        "compile": {"atoms": report.atoms, "trained": report.trained,
                    "atom_steps": report.atom_steps, "seconds": round(report.seconds, 1),
                    "atoms_per_s": round(report.atoms_per_s, 3),
                    "mean_final_loss": None if math.isnan(report.mean_final_loss)
                    else round(report.mean_final_loss, 4)},
        "config": {"train": _jsonable(asdict(config.train)), "chunk": asdict(config.chunk),
                   "store": asdict(config.store),
                   "ask": _jsonable(asdict(config.ask)), "max_new_tokens": max_new,
                   "reader": str(config.reader) if config.reader else None},
        "systems": {}, "sweep": {},
    }
    rows: list[dict] = []
    with Composer(AdapterStore(workdir / "store", readonly=True), base, embedder) as composer:
        if config.reader:
            adapter, info = read_reader(config.reader, base.fingerprint)
            composer.use_reader(adapter)
            summary["config"]["reader_info"] = info
        gold = _gold_atoms(composer.store, dataset)
        retrieved = composer.retrieve(questions, [NAMESPACE], AskConfig(k=max(ks)))
        for k in ks:
            top = [[h.id for h in row[:k]] for row in retrieved]
            summary["sweep"].setdefault(str(k), {}).update({
                "recall_at_k": _mean([bool(set(t) & set(gold[it.passage_id]))
                                      for t, it in zip(top, items)])})
        summary["recall_at_k"] = summary["sweep"][str(config.k)]["recall_at_k"]
        runs = [(s, config.k) for s in config.systems]
        runs += [(s, k) for k in ks if k != config.k for s in config.systems if s in RETRIEVING]
        done = 0
        for system, k in runs:
            if system == "oracle":
                hits = [[Hit(NAMESPACE, a, 1.0) for a in gold[it.passage_id]] for it in items]
            else:
                hits = [select(row, k, config.ask.min_score, config.ask.weighting)
                        for row in retrieved]
            ask = replace(config.ask, k=k, max_new_tokens=max_new, template=dataset.template,
                          **SYSTEMS[system])
            t0 = time.perf_counter()
            answers = []
            for start in range(0, len(items), config.batch_size):
                batch = slice(start, start + config.batch_size)
                answers += composer.ask_batch(questions[batch], [NAMESPACE], ask,
                                              hits=hits[batch])
                done += len(answers[batch])
                if progress:
                    progress("answer", done, len(runs) * len(items))
            seconds = time.perf_counter() - t0
            scored = [_score(it, a.text, dataset.template) for it, a in zip(items, answers)]
            stats = _aggregate(items, scored) | {"latency_s": round(seconds / len(items), 3)}
            if k == config.k:
                summary["systems"][system] = stats
            if system in RETRIEVING:
                summary["sweep"][str(k)][system] = {m: stats[m] for m in ("em", "f1", "contains")}
            rows += [{"id": it.id, "system": system, "k": k, "kind": it.kind,
                      "question": it.question, "answer": it.answer, "prediction": a.text,
                      **s} for it, a, s in zip(items, answers, scored)]
    return summary, rows


def compile_dataset(dataset: Dataset, workdir: Path, namespace: str, base: BaseModel,
                    embedder: Embedder, train: TrainConfig, chunk: ChunkConfig,
                    progress: Callable[[str, int, int], None] | None = None,
                    store: StoreConfig = StoreConfig()) -> CompileReport:
    """Compile every passage of ``dataset`` into ``workdir/store`` (via ``corpus.jsonl``, one
    row per passage). Pruned: a reused workdir then holds exactly this recipe's atoms, never
    another's as well."""
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": pid, "text": text}) + "\n"
                              for pid, text in dataset.passages.items()), encoding="utf-8")
    return compile_corpus([corpus], workdir / "store", base=base, embedder=embedder,
                          namespace=namespace, train_config=train, chunk_config=chunk,
                          prune=True, store_config=store,
                          progress=progress and (lambda d, t: progress("compile", d, t)))


def _gold_atoms(store: AdapterStore, dataset: Dataset) -> dict[str, list[str]]:
    """Each passage's atoms: those whose text occurs in it (atoms are deduplicated across
    passages, so provenance alone would miss a sentence two passages share)."""
    with store.read(NAMESPACE) as reader:
        atoms = [(atom_id, metrics.normalize(r.text)) for atom_id, r in reader.items()]
    out = {}
    for pid, passage in dataset.passages.items():
        text = metrics.normalize(passage)
        out[pid] = [atom_id for atom_id, t in atoms if t and t in text]
    return out


def _score(item: Item, prediction: str, template: str) -> dict:
    if template == "completion":  # probes: the continuation's first words are the answer
        n = len(metrics.normalize(item.answer).split())
        head = " ".join(metrics.normalize(prediction).split()[:n])
        return {"em": metrics.exact_match(head, item.answer), "f1": metrics.f1(head, item.answer),
                "contains": metrics.contains(prediction, item.answer)}
    out = {"em": metrics.exact_match(prediction, item.answer),
           "f1": metrics.f1(prediction, item.answer),
           "contains": metrics.contains(prediction, item.answer)}
    if item.original_answer:
        out["original"] = metrics.contains(prediction, item.original_answer)
    return out


def _aggregate(items: Sequence[Item], scored: Sequence[dict]) -> dict:
    stats = {m: _mean([s[m] for s in scored]) for m in ("em", "f1", "contains")}
    originals = [s["original"] for s in scored if "original" in s]
    if originals:
        stats["original_rate"] = _mean(originals)
    kinds = sorted({it.kind for it in items})
    if kinds != ["qa"]:
        stats["by_kind"] = {kind: {m: _mean([s[m] for it, s in zip(items, scored)
                                             if it.kind == kind])
                                   for m in ("em", "f1", "contains")} for kind in kinds}
    return stats


def _mean(xs: Sequence[float]) -> float:
    return round(sum(xs) / len(xs), 4) if xs else 0.0


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))
