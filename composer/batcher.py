"""Concurrent requests -> one generation batch: the serving loop behind ``microlora serve``.

Callers (server threads) submit a question with its own namespaces and settings and get a
future. One worker thread owns the model: it takes every request waiting (up to
``max_batch``), retrieves each request's atoms from its own namespaces, and decodes the
requests that share settings together through the per-sample adapter kernel, each row with
its own composed atoms. Requests that arrive while a batch decodes wait for the next one
(batching per request, not per token: simple, and on a CPU the batch is what pays).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from composer.composer import Composer
from composer.retrieval import retrieve
from microlora.core.config import AskConfig


@dataclass
class _Request:
    question: str
    namespaces: list[str]
    config: AskConfig
    on_text: Callable[[str], None] | None
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """What the worker has done (read by the server's /metrics)."""

    batches: int = 0
    requests: int = 0
    largest_batch: int = 0


class Batcher:
    """Batches concurrent ``ask`` requests for one ``Composer`` on a worker thread."""

    def __init__(self, composer: Composer, *, max_batch: int = 16, gap_s: float = 0.02,
                 max_wait_s: float = 0.1, on_batch: Callable[[int], None] | None = None):
        """A batch closes at ``max_batch`` requests, when no new request came for ``gap_s``,
        or ``max_wait_s`` after its first request: a lone request waits ``gap_s``, a burst
        of clients (whose requests trickle in over tens of ms) decodes as one batch."""
        self.composer, self.max_batch = composer, max_batch
        self.gap_s, self.max_wait_s = gap_s, max_wait_s
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._expected = 0  # requests announced by ``expect`` and not yet withdrawn
        self._expected_lock = threading.Lock()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="microlora-batcher", daemon=True)
        self._thread.start()

    def submit(self, question: str, namespaces: Sequence[str], config: AskConfig = AskConfig(),
               on_text: Callable[[str], None] | None = None) -> Future:
        """Queue one question, answered from ``namespaces``; the future's result is an
        ``Answer`` (or the ``MicroloraError`` that retrieval or generation raised)."""
        if not self.alive:
            raise RuntimeError("the batcher is closed")
        request = _Request(question, list(namespaces), config, on_text)
        self._queue.put(request)
        return request.future

    def expect(self) -> Callable[[], None]:
        """Announce a request on its way to ``submit`` (a server does as a request arrives,
        before parsing it): a batch being collected waits for it, up to ``max_wait_s`` after
        its first request, rather than closing after ``gap_s`` without a submission. On a
        busy 2-core server a burst of 16 clients reaches ``submit`` over ~50-100 ms, with
        gaps longer than ``gap_s``, and was decoded as two or three batches. Returns the
        function that withdraws the announcement: call it once the request is submitted or
        has failed (again: nothing)."""
        with self._expected_lock:
            self._expected += 1
        pending = True

        def withdraw() -> None:
            nonlocal pending
            with self._expected_lock:
                if pending:
                    pending = False
                    self._expected -= 1

        return withdraw

    @property
    def announced(self) -> int:
        """Requests announced by ``expect`` and not yet withdrawn."""
        return self._expected

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    # -- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            closing = False
            while len(batch) < self.max_batch:
                wait = min(self.gap_s, deadline - time.monotonic())
                try:
                    more = self._queue.get(timeout=max(0.0, wait))
                except queue.Empty:
                    if self._expected and time.monotonic() < deadline:
                        continue  # an announced request is still on its way
                    break
                if more is None:
                    closing = True
                    break
                batch.append(more)
            groups: dict[AskConfig, list[_Request]] = {}
            for request in batch:
                groups.setdefault(request.config, []).append(request)
            for config, group in groups.items():
                self._answer(config, group)
            if closing:
                return

    def _answer(self, config: AskConfig, group: list[_Request]) -> None:
        live = [r for r in group if r.future.set_running_or_notify_cancel()]
        if config.mode.retrieves:
            live, hits = self._retrieve(config, live)
        else:
            hits = [[] for _ in live]
        if live:
            self._decode(config, live, hits)

    def _decode(self, config: AskConfig, live: list[_Request], hits: list[list]) -> None:
        """Answer ``live`` as one batch. If the batch raises, one row may be the cause (a
        prompt too long for memory, a corrupt atom), so each request is answered again alone
        and only the ones that fail alone get the error; a request whose answer was already
        streamed in part cannot take that text back and gets the error too."""
        streams = [r.on_text for r in live]
        streamed = [False] * len(live)

        def on_text(row: int, piece: str) -> None:
            if streams[row] is not None:
                streamed[row] = True
                streams[row](piece)

        try:
            answers = self.composer.ask_batch([r.question for r in live], config=config,
                                              hits=hits, on_text=on_text)
        except Exception as e:  # noqa: BLE001 - handed to the callers it belongs to
            for i, r in enumerate(live):
                if len(live) == 1 or streamed[i]:
                    r.future.set_exception(e)
                else:
                    self._decode(config, [r], [hits[i]])
            return
        self.stats.batches += 1
        self.stats.requests += len(live)
        self.stats.largest_batch = max(self.stats.largest_batch, len(live))
        if self.on_batch:
            self.on_batch(len(live))
        for r, answer in zip(live, answers):
            r.future.set_result(answer)

    def _retrieve(self, config: AskConfig, requests: list[_Request]
                  ) -> tuple[list[_Request], list[list]]:
        """Each request's atoms from its own namespaces (one embedding batch for all); a
        request whose retrieval fails gets its error and leaves the batch."""
        if not requests:
            return [], []
        try:
            vectors = self.composer.embedder.encode([r.question for r in requests])
        except Exception as e:  # noqa: BLE001
            for r in requests:
                r.future.set_exception(e)
            return [], []
        kept, hits = [], []
        for r, vector in zip(requests, vectors):
            try:
                found = retrieve(self.composer.store, vector[None], r.namespaces, config.k,
                                 min_score=config.min_score, weighting=config.weighting)[0]
            except Exception as e:  # noqa: BLE001
                r.future.set_exception(e)
                continue
            kept.append(r)
            hits.append(found)
        return kept, hits

