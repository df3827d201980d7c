"""``microlora serve``: an OpenAI-compatible HTTP API over one store, with personal namespaces.

Every request carries an API key (``Authorization: Bearer KEY``) that names one user: the user
reads and writes only ``user:NAME`` and reads the shared corpora the key was granted. Answers
go through a ``Batcher``, so requests in flight together are decoded in one batch, each with
its own composed atoms. Documents are compiled into the caller's namespace by a background
job on a private copy of the base model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException

from compiler.documents import Document
from compiler.pipeline import Quota, check_quota, plan
from composer.batcher import Batcher
from composer.composer import Answer, Composer
from composer.retrieval import default_namespaces
from microlora.core.config import AskConfig, ChunkConfig, TrainConfig
from microlora.core.errors import MicroloraError, QuotaExceededError, UnknownNamespaceError
from microlora.server.jobs import CompileJobs
from microlora.server.keys import KeyRecord, KeyStore
from microlora.server.schemas import ChatRequest, CompletionRequest, DocumentsRequest

MAX_BODY_BYTES = 8 << 20


@dataclass(frozen=True)
class ServeConfig:
    """Server limits and defaults (``microlora serve`` options)."""

    max_batch: int = 16
    max_body_bytes: int = MAX_BODY_BYTES
    ask: AskConfig = AskConfig()  # defaults for k, mode, max_tokens
    train: TrainConfig = TrainConfig()  # the recipe for uploaded documents
    chunk: ChunkConfig = ChunkConfig()


class ApiError(HTTPException):
    """An HTTP error with OpenAI's error body: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(status, message)
        self.kind, self.code = kind, code


class Service:
    """Everything a running server holds: store, composer, batcher, keys, jobs, metrics."""

    def __init__(self, composer: Composer, config: ServeConfig = ServeConfig()):
        self.composer, self.config = composer, config
        self.store = composer.store
        self.keys = KeyStore(self.store.path)
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
        self.jobs_gauge = Gauge("microlora_jobs", "Compile jobs by status", ["status"],
                                registry=self.registry)
        self.batcher = Batcher(composer, max_batch=config.max_batch,
                               on_batch=self.batch_size.observe)
        self.jobs = CompileJobs(self.store, composer.base, composer.embedder,
                                model_lock=composer.model_lock, train_config=config.train,
                                chunk_config=config.chunk)

    def close(self) -> None:
        self.batcher.close()
        self.jobs.close()
        self.composer.close()

    # -- who may read what -------------------------------------------------------------------

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

    def ask_config(self, body: CompletionRequest | ChatRequest) -> AskConfig:
        d = self.config.ask
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        return replace(d, mode=body.mode or d.mode, k=body.k or d.k,
                       max_new_tokens=max_tokens or d.max_new_tokens)

    def record(self, answer: Answer) -> None:
        self.tokens.inc(answer.new_tokens)
        self.atoms_composed.inc(len(answer.sources) if answer.mode.uses_adapters else 0)


async def _caller(request: Request) -> KeyRecord:
    """The API key's record, from ``Authorization: Bearer KEY``; 401 without a valid one."""
    header = request.headers.get("authorization", "")
    if not header:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY' (create one "
                            "with `microlora keys add USER --store DIR`)",
                       "authentication_error", "missing_api_key")
    scheme, _, token = header.partition(" ")
    keys = request.app.state.service.keys
    key = keys.authenticate(token.strip()) if scheme.lower() == "bearer" else None
    if key is None:
        raise ApiError(401, "invalid API key", "authentication_error", "invalid_api_key")
    return key


Caller = Annotated[KeyRecord, Depends(_caller)]


def create_app(service: Service) -> FastAPI:
    """The FastAPI application over a ``Service``."""
    app = FastAPI(title="microlora", version="0.1.0",
                  description="OpenAI-compatible answers from composed micro-adapters")
    app.state.service = service
    _install_errors(app)
    _install_limits(app, service)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "base_model": service.composer.base.name,
                "namespaces": len(service.store.namespaces()),
                "batcher_alive": service.batcher.alive}

    @app.get("/metrics")
    async def metrics() -> Response:
        for status, n in service.jobs.counts().items():
            service.jobs_gauge.labels(status).set(n)
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(key: Caller) -> dict:
        return {"object": "list", "data": [{"id": service.composer.base.name, "object": "model",
                                            "owned_by": "microlora", "created": 0}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, key: Caller):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        return await _answer(service, "text_completion", prompts, body, key)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, key: Caller):
        try:
            question = body.question()
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return await _answer(service, "chat.completion", [question], body, key)

    @app.post("/v1/documents", status_code=202)
    def add_documents(body: DocumentsRequest, key: Caller) -> dict:
        docs = [Document(d.id or "doc-" + hashlib.sha256(d.text.encode()).hexdigest()[:16],
                         d.text, d.title) for d in body.documents]
        if len({d.source for d in docs}) != len(docs):
            raise ApiError(400, "document ids must be unique within a request")
        quota = Quota(key.max_atoms, key.max_bytes)
        base = service.composer.base
        config = service.config.train
        planned, problems, _ = plan(docs, base.tokenizer, base.fingerprint, config,
                                    service.config.chunk)
        if problems:
            raise ApiError(400, "; ".join(f"document {p.source}: {p.reason}" for p in problems))
        try:
            check_quota(service.store, key.namespace, planned, base, config, quota)
        except QuotaExceededError as e:
            raise ApiError(429, str(e), "quota_exceeded", "quota_exceeded") from None
        job = service.jobs.submit(key.namespace, docs, quota)
        return {"job": job.public()}

    @app.get("/v1/documents")
    def list_documents(key: Caller) -> dict:
        docs = service.store.documents(key.namespace) \
            if key.namespace in service.store.namespaces() else {}
        return {"object": "list", "data": [{"id": d, "atoms": len(a)} for d, a in docs.items()]}

    @app.get("/v1/jobs/{job_id}")
    def job(job_id: str, key: Caller) -> dict:
        found = service.jobs.get(job_id)
        if found is None:
            raise ApiError(404, f"no job {job_id!r}", code="job_not_found")
        if found.namespace != key.namespace:
            raise ApiError(403, "this job belongs to another user", "permission_error")
        return found.public()

    @app.get("/v1/atoms/{atom_id}")
    def atom(atom_id: str, key: Caller) -> dict:
        shared = default_namespaces(service.store)
        others = []
        for ns in service.store.namespaces():
            with service.store.read(ns) as reader:
                if atom_id not in reader:
                    continue
                if not key.can_read(ns, shared):
                    others.append(ns)
                    continue
                r = reader.get(atom_id, copy=False)
                return {"id": atom_id, "object": "microlora.atom", "namespace": ns,
                        "text": r.text, "source": r.source, "start": r.start, "end": r.end,
                        "modules": len(r.adapter.modules), "rank": r.adapter.rank}
        if others:
            raise ApiError(403, "this atom is not readable with this key", "permission_error")
        raise ApiError(404, f"no atom {atom_id!r}", code="atom_not_found")

    @app.delete("/v1/documents/{doc_id:path}")
    def delete_document(doc_id: str, key: Caller) -> dict:
        store = service.store
        if key.namespace in store.namespaces() and doc_id in store.documents(key.namespace):
            n = store.delete_document(key.namespace, doc_id)
            return {"id": doc_id, "deleted": True, "atoms_deleted": n}
        if any(doc_id in store.documents(ns) for ns in store.namespaces() if ns != key.namespace):
            raise ApiError(403, "this document belongs to another namespace", "permission_error")
        raise ApiError(404, f"no document {doc_id!r} in {key.namespace}",
                       code="document_not_found")

    @app.delete("/v1/namespace")
    def delete_namespace(key: Caller) -> dict:
        try:
            n = service.store.drop(key.namespace)
        except UnknownNamespaceError:
            n = 0
        return {"namespace": key.namespace, "deleted": True, "atoms_deleted": n}

    return app


async def _answer(service: Service, kind: str, prompts: list[str],
                  body: CompletionRequest | ChatRequest, key: KeyRecord):
    """Submit every prompt to the batcher; a JSON response, or an SSE stream."""
    config = service.ask_config(body)
    namespaces = service.search_namespaces(key, body.namespaces) if config.mode.retrieves \
        else []
    model = service.composer.base.name
    rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
    loop = asyncio.get_running_loop()
    if not body.stream:
        futures = [service.batcher.submit(p, namespaces, config) for p in prompts]
        answers = [await _result(f) for f in futures]
        for a in answers:
            service.record(a)
        return _response(kind, rid, model, answers)

    events: asyncio.Queue = asyncio.Queue()
    futures = []
    for i, p in enumerate(prompts):
        def on_text(piece: str, i: int = i) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (i, piece))

        future = service.batcher.submit(p, namespaces, config, on_text)
        future.add_done_callback(
            lambda f, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, None)))
        futures.append(future)
    first = await events.get()
    if first[1] is None and futures[first[0]].exception() is not None:
        await _result(futures[first[0]])  # raises the request's error as a 4xx, before SSE
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_sse(service, kind, rid, model, futures, events, first,
                                  include_usage),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _sse(service: Service, kind: str, rid: str, model: str, futures, events, first,
               include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
    pending = len(futures)
    event = first
    answers: list[Answer | None] = [None] * len(futures)
    while True:
        i, piece = event
        if piece is not None:
            choice = ({"index": i, "delta": {"role": "assistant", "content": piece},
                       "finish_reason": None} if kind == "chat.completion"
                      else {"index": i, "text": piece, "finish_reason": None, "logprobs": None})
            yield _event({"id": rid, "object": chunk_kind, "created": created, "model": model,
                          "choices": [choice]})
        else:
            pending -= 1
            try:
                answer = await _result(futures[i])
            except ApiError as e:
                yield _event({"error": {"message": e.detail, "type": e.kind, "code": e.code}})
            else:
                answers[i] = answer
                service.record(answer)
                choice = {"index": i, "finish_reason": _finish(answer),
                          "atoms": _atoms(answer)}
                choice |= {"delta": {}} if kind == "chat.completion" else {"text": "",
                                                                           "logprobs": None}
                yield _event({"id": rid, "object": chunk_kind, "created": created,
                              "model": model, "choices": [choice]})
        if pending == 0:
            break
        event = await events.get()
    if include_usage:
        yield _event({"id": rid, "object": chunk_kind, "created": created, "model": model,
                      "choices": [], "usage": _usage([a for a in answers if a])})
    yield "data: [DONE]\n\n"


async def _result(future) -> Answer:
    try:
        return await asyncio.wrap_future(future)
    except MicroloraError as e:
        raise ApiError(400, str(e)) from None


def _response(kind: str, rid: str, model: str, answers: list[Answer]) -> dict:
    if kind == "chat.completion":
        choices = [{"index": i, "message": {"role": "assistant", "content": a.text},
                    "finish_reason": _finish(a), "atoms": _atoms(a)}
                   for i, a in enumerate(answers)]
    else:
        choices = [{"index": i, "text": a.text, "finish_reason": _finish(a), "logprobs": None,
                    "atoms": _atoms(a)} for i, a in enumerate(answers)]
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "choices": choices, "usage": _usage(answers)}


def _atoms(answer: Answer) -> list[dict]:
    """Which atoms this answer used (composed, quoted, or both, by its mode)."""
    return [{"namespace": s.hit.namespace, "id": s.hit.id, "score": round(s.hit.score, 4),
             "weight": s.hit.weight} for s in answer.sources]


def _finish(answer: Answer) -> str:
    return "stop" if answer.finished else "length"


def _usage(answers: list[Answer]) -> dict:
    prompt = sum(a.prompt_tokens for a in answers)
    completion = sum(a.new_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _error_body(message: str, kind: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException) -> JSONResponse:
        kind = getattr(e, "kind", "invalid_request_error")
        return JSONResponse(_error_body(str(e.detail), kind, getattr(e, "code", None)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            if err.get("type") == "json_invalid":
                problems.append(f"malformed JSON: {err.get('ctx', {}).get('error', err['msg'])}")
            elif err.get("type") == "extra_forbidden":
                problems.append(f"unknown field {where!r}")
            else:
                problems.append(f"{where or 'body'}: {err['msg']}")
        return JSONResponse(_error_body("; ".join(problems), "invalid_request_error", None),
                            status_code=400)

    @app.exception_handler(MicroloraError)
    async def user_error(_request: Request, e: MicroloraError) -> JSONResponse:
        return JSONResponse(_error_body(str(e), "invalid_request_error", None), status_code=400)


def _install_limits(app: FastAPI, service: Service) -> None:
    app.add_middleware(_BodyLimit, limit=service.config.max_body_bytes)

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        service.requests.labels(route, str(response.status_code)).inc()
        service.latency.labels(route).observe(time.perf_counter() - t0)
        return response


class _BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413: at once when Content-Length says
    so, else (chunked uploads) as soon as the bytes read pass the limit, never buffering more."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = JSONResponse(_error_body(self._message(), "invalid_request_error",
                                                "body_too_large"), status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise ApiError(413, self._message(), code="body_too_large")
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body over the {self.limit / 2**20:g} MiB limit"


@contextmanager
def serve_in_thread(service: Service, host: str = "127.0.0.1", port: int = 0
                    ) -> Iterator[str]:
    """Run the server on a background thread (port 0: any free port) and yield its base URL;
    used by tests and benchmarks, which need a real server and a real HTTP client."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning",
                                           lifespan="off"))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def open_service(store_dir: str | Path, *, base_model: str | None = None,
                 embedder: str | None = None, device: str | None = None,
                 config: ServeConfig = ServeConfig()) -> Service:
    """Load the models and open (or create) the store at ``store_dir`` for serving."""
    from compiler.pipeline import store_header
    from microlora.core.embedder import load_embedder
    from microlora.core.models import load_base_model
    from store import AdapterStore

    base = load_base_model(base_model, device=device)
    emb = load_embedder(embedder, device=device)
    store = AdapterStore.open_or_create(store_dir, store_header(base, emb))
    return Service(Composer(store, base, emb), config)


__all__ = ["ServeConfig", "Service", "create_app", "open_service", "serve_in_thread"]
