"""Everything a running server holds: the store, the composer and its batcher, the API keys,
the compile jobs and the metrics; and who may read what."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from composer.batcher import Batcher
from composer.composer import Answer, Composer
from composer.retrieval import default_namespaces
from microlora.core.config import AskConfig, Mode
from microlora.core.errors import MicroloraError
from microlora.server.config import ServeConfig
from microlora.server.errors import ApiError
from microlora.server.jobs import CompileJobs
from microlora.server.keys import KeyRecord, KeyStore
from microlora.server.schemas import ChatRequest, CompletionRequest

CHARS_PER_TOKEN = 16  # a prompt longer than max_prompt_tokens * this is refused untokenized
# JSON may spell half of a UTF-16 pair alone ("\ud800"): Python keeps it, no tokenizer takes it
_SURROGATE = re.compile("[\ud800-\udfff]")


class Metrics:
    """The server's Prometheus collectors, in a registry of its own (one per server)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("microlora_requests", "HTTP requests", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("microlora_request_seconds", "HTTP request latency",
                                 ["route"], registry=self.registry)
        self.tokens = Counter("microlora_generated_tokens", "Tokens generated",
                              registry=self.registry)
        self.atoms_composed = Counter("microlora_atoms_composed", "Atoms composed into answers",
                                      registry=self.registry)
        self.batch_size = Histogram("microlora_batch_size", "Requests decoded per batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.jobs = Gauge("microlora_jobs", "Compile jobs by status", ["status"],
                          registry=self.registry)


class Service:
    """The state behind the routes (``app.state.service``)."""

    def __init__(self, composer: Composer, config: ServeConfig = ServeConfig()):
        self.composer, self.config = composer, config
        self.store = composer.store
        self.keys = KeyStore(self.store.path)
        self.metrics = Metrics()
        self.batcher = Batcher(composer, max_batch=config.max_batch,
                               on_batch=self.metrics.batch_size.observe)
        self.jobs = CompileJobs(self.store, composer.base, composer.embedder,
                                model_lock=composer.model_lock, train_config=config.train,
                                chunk_config=config.chunk, max_active=config.max_jobs_per_user,
                                keep_finished=config.jobs_kept,
                                stop_wait=config.stop_wait_s)

    def close(self) -> None:
        self.jobs.stop()  # a batch in training stops while the batcher drains
        self.batcher.close()
        self.jobs.close()
        self.composer.close()

    def search_namespaces(self, key: KeyRecord, asked: list[str] | None) -> list[str]:
        """The namespaces one request searches: the caller's own (if it has atoms) plus the
        shared corpora asked for, or every granted one. Anything not readable: 403."""
        present = self.store.namespaces()
        shared = default_namespaces(self.store)
        if asked is not None:
            for ns in asked:
                if not key.can_read(ns, shared):
                    raise ApiError(403, f"this key may not read namespace {ns!r}",
                                   "permission_error")
                if ns not in present:
                    raise ApiError(404, f"no namespace {ns!r}", code="namespace_not_found")
            chosen = [ns for ns in asked if ns != key.namespace]
        else:
            chosen = key.readable_shared(shared)
        own = [key.namespace] if key.namespace in present else []
        if not own and not chosen:
            raise ApiError(400, "nothing to search: upload documents (POST /v1/documents) or "
                                "ask for a granted shared namespace", code="no_atoms")
        return own + chosen

    def check_prompts(self, prompts: list[str], param: str) -> None:
        """Refuse (400) a prompt over ``max_prompt_tokens`` here, before it is batched: one
        long prefill takes the time, or the memory, of every request decoded beside it. A
        prompt over 16 characters per token allowed is refused without tokenizing it, and
        one that is not valid Unicode (the tokenizer would raise) before it is tokenized."""
        cap = self.config.max_prompt_tokens
        tokenizer = self.composer.base.tokenizer
        for prompt in prompts:
            if (half := _SURROGATE.search(prompt)) is not None:
                raise ApiError(400, f"{param}: not valid Unicode (an unpaired surrogate, "
                                    f"U+{ord(half.group()):04X}); send UTF-8 text", param=param)
            if len(prompt) > cap * CHARS_PER_TOKEN:
                size = f"{len(prompt)} characters"
            else:
                n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
                if n <= cap:
                    continue
                size = f"{n} tokens"
            raise ApiError(400, f"the prompt is too long ({size}): this server answers "
                                f"prompts of at most {cap} tokens (and {cap * CHARS_PER_TOKEN} "
                                "characters)", code="prompt_too_long", param=param)

    def ask_config(self, body: CompletionRequest | ChatRequest) -> AskConfig:
        d = self.config.ask
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        mode = body.mode or d.mode
        try:
            return replace(d, mode=mode, k=body.k or d.k,
                           max_new_tokens=max_tokens or d.max_new_tokens)
        except MicroloraError:  # e.g. the ensemble hybrid on a server that merges adapters
            raise ApiError(400, f"mode {Mode(mode).value!r} is not available on this server",
                           param="mode") from None

    def record(self, answer: Answer) -> None:
        self.metrics.tokens.inc(answer.new_tokens)
        self.metrics.atoms_composed.inc(len(answer.sources) if answer.mode.uses_adapters else 0)


def open_service(store_dir: str | Path, *, base_model: str | None = None,
                 embedder: str | None = None, device: str | None = None,
                 base_dtype: str | None = None,
                 config: ServeConfig = ServeConfig()) -> Service:
    """Load the models and open (or create) the store at ``store_dir`` for serving; the
    base in ``base_dtype`` (default: the store's), which the store must have been compiled
    with (the server compiles uploads into it)."""
    from compiler.pipeline import store_header
    from microlora.core.embedder import load_embedder
    from microlora.core.models import load_base_model
    from store import AdapterStore, stored_base_dtype

    base = load_base_model(base_model, device=device,
                           dtype=base_dtype or stored_base_dtype(store_dir))
    emb = load_embedder(embedder, device=device)
    store = AdapterStore.open_or_create(store_dir, store_header(base, emb),
                                        max_namespaces=config.max_namespaces,
                                        background_verify=config.store.background_verify)
    store.verify_in_background()  # every namespace, while the first questions are awaited
    return Service(Composer(store, base, emb), config)
