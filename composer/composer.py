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

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from composer.generation import Generated, continuation_logprobs, encode_prompts, generate, pad_id
from composer.prefix import PrefixCache
from composer.prompts import build_prompt, line_break_ids, stop_pattern, uses_chat
from composer.retrieval import Hit, default_namespaces, retrieve
from composer.windows import merge
from microlora.core.config import AskConfig, Mode
from microlora.core.embedder import Embedder
from microlora.core.errors import CorruptAtomError, MicroloraError
from microlora.core.kernel import MultiLoraModel
from microlora.core.models import BaseModel
from microlora.core.pack import BatchedAdapters, Packed, PackLayout, compose
from microlora.core.windows import count_tokens, window
from store import AdapterStore, AtomRecord

NOTHING_FOUND = "I found nothing relevant to this question in the store."
log = logging.getLogger(__name__)


@dataclass
class Source:
    """A retrieved atom, as ``--explain`` shows it; ``window`` is what the passage modes put
    in the prompt for it (its sentence and its neighbours: ``composer.windows``); page and
    section: where it is in its source (0 and [] where the format has none)."""

    hit: Hit
    text: str
    source: str
    start: int
    end: int
    window: list[str] = field(default_factory=list)
    page: int = 0
    section: list[str] = field(default_factory=list)


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
    found: bool = True  # False when no atom passed min_score: nothing was generated


class Composer:
    """Answers questions from one store with one base model and embedder (the store's)."""

    def __init__(self, store: AdapterStore, base: BaseModel, embedder: Embedder):
        store.check_compatible(base.fingerprint, embedder.fingerprint, base_name=base.name,
                               embedder_name=embedder.name)
        mismatch = store.check_base_dtype(base.base_dtype, strict=False)
        if mismatch:  # allowed (its cost is measured), never silent
            log.warning(mismatch)
        self.store, self.base, self.embedder = store, base, embedder
        self.lora = MultiLoraModel(base.model, {})
        self.reader: Packed | None = None
        installed = store.reader()  # by `microlora reader install`
        if installed is not None:
            self.use_reader(installed[0])
        self.model_lock = threading.Lock()  # held while the model generates
        self.line_breaks = line_break_ids(base.tokenizer)  # what end_bias favours
        self.prefixes = PrefixCache()  # the prompts' shared prefix, computed once

    @classmethod
    def open(cls, store_dir: str | Path, *, base_model: str | Path | None = None,
             embedder: str | Path | None = None, device: str | None = None,
             base_dtype: str | None = None, background_verify: bool = False) -> Composer:
        """Open a store read-only and load the models it was compiled with (the packaged
        defaults unless paths are given), the base in the store's quantization unless
        ``base_dtype`` says otherwise (``load_base_model``'s dtype). ``background_verify``:
        for a composer kept to answer many questions (``StoreConfig.background_verify``; a
        one-shot ``ask`` leaves it off: hashing the store would compete with the model)."""
        from microlora.core.embedder import load_embedder
        from microlora.core.models import load_base_model

        store = AdapterStore(store_dir, readonly=True, background_verify=background_verify)
        try:
            base = load_base_model(base_model, device=device,
                                   dtype=base_dtype or store.header.base_dtype)
            return cls(store, base, load_embedder(embedder, device=device))
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

    @contextmanager
    def fetch(self, requests: Sequence[Sequence[Hit]], *, skip_corrupt: bool = False
              ) -> Iterator[dict[tuple[str, str], AtomRecord]]:
        """Every hit's record (text, provenance and packed adapter) by (namespace, id), from
        one read transaction per namespace: zero-copy views, valid inside the ``with`` block.
        With ``skip_corrupt``, an atom whose record is corrupt is left out (and logged, by
        id) instead of failing every question of the batch."""
        wanted: dict[str, dict[str, None]] = {}
        for hits in requests:
            for h in hits:
                wanted.setdefault(h.namespace, {})[h.id] = None
        on_corrupt = _left_out if skip_corrupt else None
        with ExitStack() as stack:
            records = {}
            for ns, ids in sorted(wanted.items()):
                reader = stack.enter_context(self.store.read(ns))
                records.update({(ns, r.id): r
                                for r in reader.gather(list(ids), on_corrupt=on_corrupt)})
            yield records

    def compose(self, requests: Sequence[Sequence[Hit]],
                records: dict[tuple[str, str], AtomRecord] | None = None,
                reader: bool = True) -> BatchedAdapters:
        """The kernel's per-request tensors (module -> (A (N, R, in), B (N, out, R))) for the
        hits of each request, each weighted by its hit's weight, the store's reader first
        (unless ``reader`` is False) in each request with an atom of non-zero weight (the
        reader reads atoms; beside silenced ones, as in hybrid's passage row, it only pulls
        the answer away from the passage: RESULTS.md "Fidelity VI"): read from the store
        (``records``, from ``fetch``, or fetched here; zero-copy views of bf16 atoms, int8
        ones dequantized) and copied once."""
        if records is None:
            with self.fetch(requests) as fetched:
                return self.compose(requests, fetched, reader)
        rows = [[records[(h.namespace, h.id)].adapter for h in hits] for hits in requests]
        for layout in {p.layout for row in rows for p in row}:
            self._attach(layout)
        return compose(rows, [[h.weight for h in hits] for hits in requests],
                       shared=self.reader if reader else None, dtype=self.base.dtype,
                       device=self.base.device,
                       shared_in=[any(h.weight for h in hits) for hits in requests])

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

    def use_reader(self, adapter: Packed | None) -> None:
        """Compose this shared reader adapter (``compiler.reader``) into every request that
        uses atom adapters; None to stop."""
        if adapter is not None:
            self._attach(adapter.layout)
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
        if config.mode.retrieves and not all(hits):
            return self._answer_found(questions, hits, config, on_text, t0)
        with self.fetch(hits, skip_corrupt=True) as records:  # one read: texts and adapters
            intact = [[h for h in row if (h.namespace, h.id) in records] for row in hits]
            answerable = not config.mode.retrieves or all(intact)
            if answerable:
                hits = intact
                sources = [[self._source(h, records[(h.namespace, h.id)], config) for h in row]
                           for row in hits]
                rows = self._rows(questions, hits, sources, config)
                adapters = self.compose(rows.hits, records, reader=config.reader) \
                    if config.mode.uses_adapters and any(hits) else None
        if not answerable:  # every atom of some question was corrupt: as if none was found
            return self._answer_found(questions, intact, config, on_text, t0)
        tok = self.base.tokenizer
        ids, mask = encode_prompts(tok, rows.prompts, self.base.device,
                                   chat=uses_chat(tok, config.template))
        rerank = rows.rerank
        prefix = self.prefixes.for_prompts(tok, config.template, config.mode.uses_passages,
                                           adapted=config.atoms_on_prefix) \
            if config.prefix_cache else None
        with self.model_lock, self._applied(adapters, config):
            outs = generate(self.base.model, tok, ids, mask,
                            max_new_tokens=config.max_new_tokens,
                            stop=stop_pattern(tok, config.template),
                            no_repeat_ngram=config.no_repeat_ngram,
                            end_ids=self._end_ids(config), end_bias=rows.end_bias,
                            logit_bias=self._echo_bias(questions, rows, config),
                            ensemble=rows.weights, gate=rows.gate,
                            on_text=None if rerank else on_text,
                            on_rows=self.lora.select_samples, prefix=prefix)
        if rerank:
            outs = self._rerank(outs, ids, mask, adapters, config)
            for i, o in enumerate(outs if on_text is not None else ()):
                on_text(i, o.text)
        seconds = time.perf_counter() - t0
        prompt_tokens = mask.sum(1).tolist()[:len(questions)]
        return [Answer(q, o.text, config.mode, srcs, o.new_tokens, seconds, n, o.finished)
                for q, o, srcs, n in zip(questions, outs, sources, prompt_tokens)]

    def _answer_found(self, questions: Sequence[str], hits: Sequence[Sequence[Hit]],
                      config: AskConfig, on_text: Callable[[int, str], None] | None,
                      t0: float) -> list[Answer]:
        """Questions that retrieval found nothing relevant for (every atom under
        ``min_score``) get that said, not an answer made up from unrelated atoms; the rest
        are answered as one batch."""
        found = [i for i, row in enumerate(hits) if row]
        stream = None if on_text is None else (lambda row, piece: on_text(found[row], piece))
        answered = iter(self.ask_batch([questions[i] for i in found], config=config,
                                       on_text=stream, hits=[hits[i] for i in found])
                        if found else [])
        out = []
        for i, question in enumerate(questions):
            if hits[i]:
                out.append(next(answered))
                continue
            if on_text is not None:
                on_text(i, NOTHING_FOUND)
            out.append(Answer(question, NOTHING_FOUND, config.mode, [],
                              seconds=time.perf_counter() - t0, found=False))
        return out

    def _rows(self, questions: Sequence[str], hits: Sequence[Sequence[Hit]],
              sources: Sequence[Sequence[Source]], config: AskConfig) -> _Rows:
        """What each question is decoded from: one row (its prompt, its atoms), or for the
        ensemble hybrid two, the atoms' adapters with the bare question and the passages
        with the atoms at weight 0 (no atom adapter, same batch; a store's reader adapter
        only in the first: ``compose``)."""
        def prompts(with_passages: bool) -> list[str]:
            return [build_prompt(self.base.tokenizer, q, passages(srcs) if with_passages else (),
                                 config.template)
                    for q, srcs in zip(questions, sources)]

        if config.mode is Mode.HYBRID and config.hybrid != "joint" and any(hits):
            silent = [[replace(h, weight=0.0) for h in row] for row in hits]
            bias = [config.end_bias] * len(questions) + [0.0] * len(questions)
            if config.hybrid == "rerank":  # each row answers alone; _rerank chooses
                return _Rows(prompts(False) + prompts(True), [*hits, *silent],
                             torch.tensor(bias), (), rerank=True)
            return _Rows(prompts(False) + prompts(True), [*hits, *silent], torch.tensor(bias),
                         (1.0, config.passage_weight), 1 if config.hybrid == "gated" else None)
        return _Rows(prompts(config.mode.uses_passages), list(hits), config.end_bias, ())

    def _rerank(self, outs: list[Generated], ids: torch.Tensor, mask: torch.Tensor,
                adapters: BatchedAdapters | None, config: AskConfig) -> list[Generated]:
        """The rerank hybrid's choice between each question's two answers (the adapters'
        row, rows 0..N-1, and the passages' row, N..2N-1): the one with the higher
        log p(adapters) + passage_weight * log p(passages), each answer scored as a whole
        (with the line break that ends it) under both rows' prompts and adapters."""
        n = len(outs) // 2
        differ = [i for i in range(n) if outs[i].text != outs[n + i].text and outs[i].text]
        chosen = [outs[n + i] if outs[n + i].text or not outs[i].text else outs[i]
                  for i in range(n)]
        if not differ:
            return chosen
        tok = self.base.tokenizer
        rows = [r for i in differ for r in (i, i, n + i, n + i)]  # (row, candidate) pairs
        cands = [tok(f" {outs[c].text}\n", add_special_tokens=False)["input_ids"]
                 for i in differ for c in (i, n + i, i, n + i)]
        index = torch.tensor(rows, device=ids.device)
        picked = None if adapters is None else {
            name: (A[index.to(A.device)], B[index.to(B.device)])
            for name, (A, B) in adapters.items()}
        with self.model_lock, self._applied(picked, config):
            lp = continuation_logprobs(self.base.model, ids[index], mask[index], cands,
                                       pad_id(tok)).view(len(differ), 2, 2)  # (q, row, cand)
        score = lp[:, 0] + config.passage_weight * lp[:, 1]  # (q, cand)
        for j, i in enumerate(differ):
            chosen[i] = outs[i] if score[j, 0] > score[j, 1] else outs[n + i]
        return chosen

    def _echo_bias(self, questions: Sequence[str], rows: _Rows, config: AskConfig
                   ) -> torch.Tensor | None:
        """``echo_penalty`` taken off, in the rows with adapters, from the tokens that would
        begin a name the question itself names: composed atoms tend to answer with the
        salient name of their sentence, often the one the question asks about."""
        if not config.echo_penalty or not config.mode.uses_adapters:
            return None
        tok, n = self.base.tokenizer, len(questions)
        vocab = self.base.model.get_output_embeddings().weight.shape[0]
        bias = torch.zeros(len(rows.prompts), vocab, device=self.base.device)
        adapted = n if len(rows.prompts) > n else len(rows.prompts)  # hybrids: the first N
        for i in range(adapted):
            for word in question_names(questions[i % n]):
                for text in (word, " " + word):
                    first = tok(text, add_special_tokens=False)["input_ids"][:1]
                    bias[i, first] = -config.echo_penalty
        return bias

    def _source(self, hit: Hit, record: AtomRecord, config: AskConfig) -> Source:
        """The hit's text and provenance, and its window when the mode reads passages."""
        text = record.text
        if config.mode.uses_passages and record.context:
            shown = window(record.context, record.context_at, config.window_tokens,
                           functools.partial(count_tokens, self.base.tokenizer))
        else:
            shown = [text]
        return Source(hit, text, record.source, record.start, record.end, shown,
                      record.page, list(record.section))

    def _end_ids(self, config: AskConfig) -> list[int]:
        """The tokens ``end_bias`` favours: line breaks, when adapters are composed into a base
        model's prompt (none otherwise)."""
        if not config.mode.uses_adapters or uses_chat(self.base.tokenizer, config.template):
            return []
        return self.line_breaks

    @contextmanager
    def _applied(self, adapters: BatchedAdapters | None, config: AskConfig):
        """The composed adapters active on the model for the ``with`` body: beside the frozen
        weights (stacked), or folded into them and restored after (merged)."""
        if adapters is None:
            yield
            return
        with self.lora.merged(adapters) if config.composition == "merged" else \
                self.lora.adapters(adapters):
            yield


@dataclass
class _Rows:
    """The batch a set of questions is decoded from (``generate``'s ensemble layout)."""

    prompts: list[str]
    hits: list[list[Hit]]  # the atoms composed into each row
    end_bias: float | torch.Tensor  # one value, or one per row
    weights: tuple[float, ...]  # the ensemble's weight per group of rows; () for one row each
    gate: int | None = None  # the group whose confidence silences the others (``generate``)
    rerank: bool = False  # the two groups decode alone; ``Composer._rerank`` picks


def _left_out(e: CorruptAtomError) -> None:
    log.warning("%s; answering without it", e)


_NAME_WORD = re.compile(r"(?<=\s)[A-Z][\w'’-]*")
_ARTICLES = {"The", "A", "An"}


def question_names(question: str) -> set[str]:
    """The first word of each capitalised name in a question (not its opening word)."""
    names = set()
    for m in _NAME_WORD.finditer(question):
        before = question[:m.start()].split()
        if m.group() in _ARTICLES or (before and before[-1][:1].isupper() and
                                      before[-1] not in _ARTICLES):
            continue  # an article, or inside a name already counted
        names.add(m.group())
    return names


def passages(sources: Sequence[Source]) -> list[str]:
    """The distinct windows of these atoms, in rank order, for the prompt."""
    return [" ".join(run) for run in merge([s.window for s in sources])]
