"""Answering a completion request through the batcher: the whole JSON response at once, or
the answer streamed piece by piece as server-sent events."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from composer.composer import Answer
from microlora.server import openai
from microlora.server.errors import ApiError, api_error, error_body
from microlora.server.keys import KeyRecord
from microlora.server.schemas import ChatRequest, CompletionRequest
from microlora.server.service import Service


async def answer(service: Service, kind: str, prompts: list[str],
                 body: CompletionRequest | ChatRequest, key: KeyRecord,
                 arrived: Callable[[], None]):
    """Submit every prompt to the batcher, then ``arrived()`` (the request's announcement
    to the batcher is withdrawn: ``middleware.Announce``); a JSON response, or an SSE
    stream."""
    config = service.ask_config(body)
    namespaces = service.search_namespaces(key, body.namespaces) if config.mode.retrieves \
        else []
    model = service.composer.base.name
    rid = ("chatcmpl-" if kind == openai.CHAT else "cmpl-") + uuid.uuid4().hex[:24]
    if not body.stream:
        futures = [service.batcher.submit(p, namespaces, config) for p in prompts]
        arrived()
        answers = [await result(f) for f in futures]
        for a in answers:
            service.record(a)
        return openai.response(kind, rid, model, answers)

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()  # (answer index, piece), piece None when done
    futures = []
    for i, p in enumerate(prompts):
        def on_text(piece: str, i: int = i) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (i, piece))

        future = service.batcher.submit(p, namespaces, config, on_text)
        future.add_done_callback(
            lambda f, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, None)))
        futures.append(future)
    arrived()
    first = await events.get()
    if first[1] is None and futures[first[0]].exception() is not None:
        await result(futures[first[0]])  # raises the request's error as a 4xx, before SSE
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_sse(service, kind, rid, model, futures, events, first,
                                  include_usage),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _sse(service: Service, kind: str, rid: str, model: str, futures, events, first,
               include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    pending = len(futures)
    event = first
    answers: list[Answer | None] = [None] * len(futures)
    while True:
        i, piece = event
        if piece is not None:
            yield openai.event(openai.chunk(kind, rid, created, model,
                                            [openai.piece_choice(kind, i, piece)]))
        else:
            pending -= 1
            try:
                answers[i] = await result(futures[i])
            except ApiError as e:
                yield openai.event(error_body(e.detail, e.kind, e.code, e.param))
            else:
                service.record(answers[i])
                yield openai.event(openai.chunk(kind, rid, created, model,
                                                [openai.final_choice(kind, i, answers[i])]))
        if pending == 0:
            break
        event = await events.get()
    if include_usage:
        yield openai.event(openai.chunk(kind, rid, created, model, [],
                                        usage=openai.usage([a for a in answers if a])))
    yield "data: [DONE]\n\n"


async def result(future) -> Answer:
    """A batcher future's answer; its failure in API terms (``api_error``)."""
    try:
        return await asyncio.wrap_future(future)
    except Exception as e:  # noqa: BLE001 - this request's own failure
        raise api_error(e) from None
