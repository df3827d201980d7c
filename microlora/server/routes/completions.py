"""``POST /v1/completions`` and ``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter

from microlora.server import openai, streaming
from microlora.server.auth import Caller, Served
from microlora.server.errors import ApiError
from microlora.server.middleware import Arrival
from microlora.server.schemas import ChatRequest, CompletionRequest

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, key: Caller, service: Served,
                      arrived: Arrival):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    service.check_prompts(prompts, "prompt")
    return await streaming.answer(service, openai.TEXT, prompts, body, key, arrived)


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, key: Caller, service: Served, arrived: Arrival):
    try:
        question = body.question()
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    service.check_prompts([question], "messages")
    return await streaming.answer(service, openai.CHAT, [question], body, key, arrived)
