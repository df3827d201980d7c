"""Building a reader (``compiler.reader``) from a QA dataset: compile the dataset's passages
into a scratch store with the recipe the reader will serve, retrieve each question's atoms the
way the composer will, and train the reader to answer with them composed beside it.

Train it on data disjoint from anything it is evaluated on: ``--split tune`` of cpkc_dev is
the default, and ``microlora eval`` reports on ``--split eval``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from compiler.reader import ReaderExample, train_reader
from composer import Composer
from composer.prompts import build_prompt
from microlora.core.config import AskConfig, ChunkConfig, ReaderConfig, TrainConfig
from microlora.core.embedder import Embedder
from microlora.core.errors import MicroloraError
from microlora.core.models import BaseModel
from microlora.evaluation.datasets import Dataset
from microlora.evaluation.harness import compile_dataset
from microlora.evaluation.metrics import normalize
from store import AdapterStore
from store.peft import write_reader

NAMESPACE = "reader-train"


def build_reader(dataset: Dataset, workdir: str | Path, out_dir: str | Path, base: BaseModel,
                 embedder: Embedder, *, k: int = AskConfig.k,
                 train: TrainConfig = TrainConfig(), chunk: ChunkConfig = ChunkConfig(),
                 config: ReaderConfig = ReaderConfig(),
                 progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Compile, retrieve, train, and write the reader to ``out_dir``; returns it. With
    ``config.answerable_only`` a question is trained on only when one of its retrieved atoms'
    sentences holds the answer: a reader taught to answer what its atoms do not say learns to
    guess (names shaped like its training answers) instead of reading the atoms."""
    workdir = Path(workdir)
    compile_dataset(dataset, workdir, NAMESPACE, base, embedder, train, chunk, progress)
    examples = []
    with Composer(AdapterStore(workdir / "store", readonly=True), base, embedder) as composer:
        questions = [it.question for it in dataset.items]
        hits = composer.retrieve(questions, [NAMESPACE], AskConfig(k=k))
        with composer.store.read(NAMESPACE) as reader:
            for item, row in zip(dataset.items, hits):
                records = [reader.get(h.id, copy=True) for h in row]
                if config.answerable_only and not any(
                        normalize(item.answer) in normalize(r.text) for r in records):
                    continue
                examples.append(ReaderExample(
                    build_prompt(base.tokenizer, item.question, (), dataset.template),
                    f" {item.answer}\n", [r.adapter for r in records]))
    if not examples:
        raise MicroloraError(f"no question of {len(dataset.items)} has its answer in the text "
                             f"of its {k} retrieved atom(s): nothing to train the reader on "
                             "(train on all questions with --all-questions)")
    adapter = train_reader(base, examples, config, progress=progress and (
        lambda step, steps, _loss: progress("train", step, steps)))
    return write_reader(out_dir, adapter, base_fingerprint=base.fingerprint,
                        base_model=str(base.path), info={
                            "dataset": dataset.source or dataset.name,
                            "questions": len(examples), "asked": len(dataset.items), "k": k,
                            "recipe": train.key(), "reader": {
                                "rank": config.rank, "lr": config.lr, "epochs": config.epochs,
                                "answerable_only": config.answerable_only,
                                "batch": config.batch, "seed": config.seed}})
