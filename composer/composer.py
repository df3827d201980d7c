"""The composer: question -> retrieved atoms -> their adapters composed into the base model
for this request -> answer.

Two ways to apply the composed adapter, with the same outputs:

- ``stacked`` (default): the atoms' low-rank factors go through the per-sample kernel; base
  weights are never touched, and one batch can carry requests with different atom sets;
- ``merged``: W += sum of the atoms' deltas for one request, restored exactly afterwards (even
  if generation raises); no per-token cost, one request at a time.

The model is shared by every request, so calls into it are serialised by a lock; concurrency
comes from batching requests (``ask_batch``), not from threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from composer.generation import encode_prompts, generate
from composer.prompts import TEMPLATES, Mode, build_prompt, line_break_ids, stop_pattern, uses_chat
from composer.retrieval import Hit, default_namespaces, retrieve
from microlora.embedder import Embedder
from microlora.errors import MicroloraError
from microlora.lora import (
    MultiLoraModel,
    PackLayout,
    compose_packed,
    prepend_shared,
    stack_adapters,
)
from microlora.models import BaseModel
from store import AdapterStore, Reader
from store.peft import read_reader

READER_DIR = "reader"  # <store>/reader: the store's reader adapter, if it has one

COMPOSITIONS = ("stacked", "merged")
HYBRIDS = ("ensemble", "joint")


@dataclass(frozen=True)
class AskConfig:
    """How a question is answered.

    k: atoms composed per question (measured: benchmarks/RESULTS.md, "choosing k").
    min_score: drop retrieved atoms with a lower cosine similarity (None keeps all k).
    weighting: "uniform" (every atom at weight 1, as trained) or "score".
    composition: "stacked" or "merged" (same outputs; see the module docstring).
    no_repeat_ngram: > 0 bans repeating an n-gram of the answer (composed adapters can loop).
    reader: compose the store's reader adapter (if it has one) beside the atoms.
    end_bias: added to the line-break logits once an answer has begun, in the modes that
        compose adapters (base models' prompts): composed atoms answer with a name and then
        run on, while in-context copying ends well by itself and a bias cuts its names short
        (measured: benchmarks/RESULTS.md, "ending answers").
    hybrid: "ensemble" decodes the answer from two rows at once, the adapters with the bare
        question and the passages with no adapters, each token maximising
        log p(adapters) + passage_weight * log p(passages); "joint" puts both in one row,
        where the composed adapters disturb the reading of the passages (measured:
        benchmarks/RESULTS.md, "hybrid as an ensemble"). Twice the rows per question.
    """

    mode: Mode = Mode.PARAMETRIC
    k: int = 1
    min_score: float | None = None
    weighting: str = "uniform"
    composition: str = "stacked"
    max_new_tokens: int = 32
    no_repeat_ngram: int = 0
    template: str = "qa"  # or "completion": continue the question as plain text
    reader: bool = True
    end_bias: float = 8.0
    hybrid: str = "ensemble"
    passage_weight: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))
        if self.template not in TEMPLATES:
            raise MicroloraError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.composition not in COMPOSITIONS:
            raise MicroloraError(f"composition must be one of {COMPOSITIONS}, "
                                 f"got {self.composition!r}")
        if self.max_new_tokens < 1:
            raise MicroloraError("max_new_tokens must be at least 1")
        if self.hybrid not in HYBRIDS:
            raise MicroloraError(f"hybrid must be one of {HYBRIDS}, got {self.hybrid!r}")
        if self.passage_weight < 0:
            raise MicroloraError("passage_weight must be at least 0")
        if self.mode is Mode.HYBRID and self.hybrid == "ensemble" and \
                self.composition == "merged":
            raise MicroloraError("the ensemble hybrid keeps the adapters out of its passage "
                                 "row, which merged weights cannot: use stacked composition, "
                                 "or the joint hybrid (--hybrid joint)")


@dataclass
class Source:
    """A composed atom, as ``--explain`` shows it."""

    hit: Hit
    text: str
    source: str
    start: int
    end: int


@dataclass
class Answer:
    question: str
    text: str
    mode: Mode
    sources: list[Source] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0
    finished: bool = True  # False when max_new_tokens cut the answer short


class Composer:
    """Answers questions from one store with one base model and embedder (the store's)."""

    def __init__(self, store: AdapterStore, base: BaseModel, embedder: Embedder):
        store.check_compatible(base.fingerprint, embedder.fingerprint, base_name=base.name,
                               embedder_name=embedder.name)
        self.store, self.base, self.embedder = store, base, embedder
        self.lora = MultiLoraModel(base.model, {})
        self.reader: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        if (store.path / READER_DIR).is_dir():  # installed by `microlora reader install`
            self.use_reader(read_reader(store.path / READER_DIR, base.fingerprint)[0])
        self.model_lock = threading.Lock()  # held while the model generates
        self.line_breaks = line_break_ids(base.tokenizer)  # what end_bias favours

    @classmethod
    def open(cls, store_dir: str | Path, *, base_model: str | Path | None = None,
             embedder: str | Path | None = None, device: str | None = None) -> Composer:
        """Open a store read-only and load the models it was compiled with (the packaged
        defaults unless paths are given)."""
        from microlora.embedder import load_embedder
        from microlora.models import load_base_model

        store = AdapterStore(store_dir, readonly=True)
        try:
            return cls(store, load_base_model(base_model, device=device),
                       load_embedder(embedder, device=device))
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        self.lora.remove()
        self.store.close()

    def __enter__(self) -> Composer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the stages --------------------------------------------------------------------------

    def retrieve(self, questions: Sequence[str], namespaces: Sequence[str] | None = None,
                 config: AskConfig = AskConfig()) -> list[list[Hit]]:
        namespaces = list(namespaces) if namespaces else default_namespaces(self.store)
        vectors = self.embedder.encode(list(questions))
        return retrieve(self.store, vectors, namespaces, config.k, min_score=config.min_score,
                        weighting=config.weighting)

    def compose(self, requests: Sequence[Sequence[Hit]]) -> dict[str, tuple[torch.Tensor,
                                                                           torch.Tensor]]:
        """The kernel's per-request tensors (module -> (A (N, R, in), B (N, out, R))) for the
        hits of each request, read zero-copy from the store and copied once."""
        model = self.base.model
        dtype, device = next(model.parameters()).dtype, self.base.device
        with ExitStack() as stack:
            readers = self._readers(stack, requests)
            packed = [[_gather_one(readers[h.namespace], h.id) for h in hits]
                      for hits in requests]
            layouts = {layout for row in packed for _, layout in row}
            for layout in layouts:
                self._attach(layout)
            weights = [[h.weight for h in hits] for hits in requests]
            if len(layouts) == 1 and len({len(row) for row in packed}) == 1:
                flats = [[flat for flat, _ in row] for row in packed]
                return compose_packed(flats, layouts.pop(), torch.tensor(weights),
                                      dtype=dtype, device=device)
            # ragged requests, or atoms of different recipes: unpack and pad per module
            unpacked = [[layout.unpack(flat) for flat, layout in row] for row in packed]
            return stack_adapters(unpacked, weights=weights, dtype=dtype, device=device)

    def _readers(self, stack: ExitStack, requests: Sequence[Sequence[Hit]]) -> dict[str, Reader]:
        """One read transaction per namespace the hits come from, open until ``stack`` closes."""
        return {ns: stack.enter_context(self.store.read(ns))
                for ns in sorted({h.namespace for hits in requests for h in hits})}

    def _attach(self, layout: PackLayout) -> None:
        """Wrap the linears this layout adapts (once; the wrappers are free when idle)."""
        missing = [name for name, *_ in layout.modules if name not in self.lora.layers]
        if missing:
            try:
                modules = {name: self.base.model.get_submodule(name) for name in missing}
            except AttributeError as e:
                raise MicroloraError(f"the store's adapters target {missing[0]}, which the "
                                     "base model does not have") from e
            self.lora.layers.update(MultiLoraModel(self.base.model, modules).layers)

    def use_reader(self, adapter: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """Compose this shared reader adapter (``compiler.reader``) into every request that
        uses atom adapters; None to stop."""
        if adapter:
            self._attach(PackLayout.of(adapter))
        self.reader = adapter

    # -- answering ---------------------------------------------------------------------------

    def ask(self, question: str, namespaces: Sequence[str] | None = None,
            config: AskConfig = AskConfig(), *,
            on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer one question; ``on_text`` receives the answer as it is generated."""
        stream = None if on_text is None else (lambda _row, piece: on_text(piece))
        return self.ask_batch([question], namespaces, config, on_text=stream)[0]

    def ask_batch(self, questions: Sequence[str], namespaces: Sequence[str] | None = None,
                  config: AskConfig = AskConfig(), *,
                  on_text: Callable[[int, str], None] | None = None,
                  hits: Sequence[Sequence[Hit]] | None = None) -> list[Answer]:
        """Answer several questions in one generation batch, each with its own atoms
        (retrieved, or ``hits`` when given: e.g. the gold atoms, for an oracle, or a server's
        requests retrieved each from their own namespaces). ``on_text(i, piece)`` streams
        question i's answer."""
        if not questions or any(not isinstance(q, str) or not q.strip() for q in questions):
            raise MicroloraError("every question must be a non-empty string")
        if config.composition == "merged" and len(questions) > 1 and config.mode.uses_adapters:
            raise MicroloraError("merged composition answers one question at a time; use "
                                 "stacked for batches")
        t0 = time.perf_counter()
        if not config.mode.retrieves:
            hits = [[] for _ in questions]
        elif hits is None:
            hits = self.retrieve(questions, namespaces, config)
        elif len(hits) != len(questions):
            raise MicroloraError("hits must hold one list of atoms per question")
        sources = self._sources(hits)
        tok = self.base.tokenizer
        rows = self._rows(questions, hits, sources, config)
        ids, mask = encode_prompts(tok, rows.prompts, self.base.device,
                                   chat=uses_chat(tok, config.template))
        with self.model_lock, self._adapters_for(rows.hits, config):
            outs = generate(self.base.model, tok, ids, mask,
                            max_new_tokens=config.max_new_tokens,
                            stop=stop_pattern(tok, config.template),
                            no_repeat_ngram=config.no_repeat_ngram,
                            end_ids=self._end_ids(config), end_bias=rows.end_bias,
                            ensemble=rows.weights, on_text=on_text,
                            on_rows=self.lora.select_samples)
        seconds = time.perf_counter() - t0
        prompt_tokens = mask.sum(1).tolist()[:len(questions)]
        return [Answer(q, o.text, config.mode, srcs, o.new_tokens, seconds, n, o.finished)
                for q, o, srcs, n in zip(questions, outs, sources, prompt_tokens)]

    def _rows(self, questions: Sequence[str], hits: Sequence[Sequence[Hit]],
              sources: Sequence[Sequence[Source]], config: AskConfig) -> _Rows:
        """What each question is decoded from: one row (its prompt, its atoms), or for the
        ensemble hybrid two, the atoms' adapters with the bare question and the passages
        with the atoms at weight 0 (no atom adapter, same batch; a store's reader adapter is
        in both)."""
        def prompts(with_passages: bool) -> list[str]:
            return [build_prompt(self.base.tokenizer, q, [s.text for s in srcs]
                                 if with_passages else (), config.template)
                    for q, srcs in zip(questions, sources)]

        if config.mode is Mode.HYBRID and config.hybrid == "ensemble" and any(hits):
            silent = [[replace(h, weight=0.0) for h in row] for row in hits]
            bias = [config.end_bias] * len(questions) + [0.0] * len(questions)
            return _Rows(prompts(False) + prompts(True), [*hits, *silent], torch.tensor(bias),
                         (1.0, config.passage_weight))
        return _Rows(prompts(config.mode.uses_passages), list(hits), config.end_bias, ())

    def _end_ids(self, config: AskConfig) -> list[int]:
        """The tokens ``end_bias`` favours: line breaks, when adapters are composed into a base
        model's prompt (none otherwise)."""
        if not config.mode.uses_adapters or uses_chat(self.base.tokenizer, config.template):
            return []
        return self.line_breaks

    @contextmanager
    def _adapters_for(self, hits: Sequence[Sequence[Hit]], config: AskConfig):
        if not config.mode.uses_adapters or not any(hits):
            yield
            return
        adapters = self.compose(hits)
        if self.reader and config.reader:
            adapters = prepend_shared(adapters, self.reader)
        if config.composition == "merged":
            ctx = self.lora.merged({name: (A[0], B[0]) for name, (A, B) in adapters.items()})
        else:
            ctx = self.lora.adapters(adapters)
        with ctx:
            yield

    def _sources(self, hits: Sequence[Sequence[Hit]]) -> list[list[Source]]:
        """The text and provenance of every hit (metadata only; no adapter is copied)."""
        with ExitStack() as stack:
            readers = self._readers(stack, hits)
            out = []
            for row in hits:
                records = [(h, readers[h.namespace].get(h.id)) for h in row]
                out.append([Source(h, r.text, r.source, r.start, r.end) for h, r in records])
            return out


@dataclass
class _Rows:
    """The batch a set of questions is decoded from (``generate``'s ensemble layout)."""

    prompts: list[str]
    hits: list[list[Hit]]  # the atoms composed into each row
    end_bias: float | torch.Tensor  # one value, or one per row
    weights: tuple[float, ...]  # the ensemble's weight per group of rows; () for one row each


def _gather_one(reader: Reader, atom_id: str) -> tuple[torch.Tensor, PackLayout]:
    (flat,), layout = reader.gather([atom_id])
    return flat, layout
