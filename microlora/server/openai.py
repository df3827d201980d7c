"""OpenAI's response shapes for answers: completions, chat completions and their stream
chunks, with microlora's ``atoms`` (which atoms each answer used) on every choice."""

from __future__ import annotations

import json
import time

from composer.composer import Answer
from microlora.core.provenance import cite

CHAT = "chat.completion"
TEXT = "text_completion"


def response(kind: str, rid: str, model: str, answers: list[Answer]) -> dict:
    if kind == CHAT:
        choices = [{"index": i, "message": {"role": "assistant", "content": a.text},
                    "finish_reason": finish(a), "atoms": atoms(a)}
                   for i, a in enumerate(answers)]
    else:
        choices = [{"index": i, "text": a.text, "finish_reason": finish(a), "logprobs": None,
                    "atoms": atoms(a)} for i, a in enumerate(answers)]
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(answers)}


def piece_choice(kind: str, i: int, piece: str) -> dict:
    """A stream chunk's choice carrying the next piece of answer i."""
    if kind == CHAT:
        return {"index": i, "delta": {"role": "assistant", "content": piece},
                "finish_reason": None}
    return {"index": i, "text": piece, "finish_reason": None, "logprobs": None}


def final_choice(kind: str, i: int, answer: Answer) -> dict:
    """The stream chunk's choice that ends answer i: why it ended and its atoms."""
    choice = {"index": i, "finish_reason": finish(answer), "atoms": atoms(answer)}
    return choice | ({"delta": {}} if kind == CHAT else {"text": "", "logprobs": None})


def chunk(kind: str, rid: str, created: int, model: str, choices: list[dict],
          **extra) -> dict:
    return {"id": rid, "object": f"{CHAT}.chunk" if kind == CHAT else kind, "created": created,
            "model": model, "choices": choices, **extra}


def atoms(answer: Answer) -> list[dict]:
    """Which atoms this answer used (composed, quoted, or both, by its mode), with what
    ``GET /v1/atoms/ID`` says of where each came from, so a client can show the sources
    beside the answer without a request per atom."""
    return [{"namespace": s.hit.namespace, "id": s.hit.id, "score": round(s.hit.score, 4),
             "weight": s.hit.weight, "text": s.text, "source": s.source,
             "page": s.page or None, "section": list(s.section),
             "citation": cite(s.source, s.page, s.section)} for s in answer.sources]


def finish(answer: Answer) -> str:
    return "stop" if answer.finished else "length"


def usage(answers: list[Answer]) -> dict:
    prompt = sum(a.prompt_tokens for a in answers)
    completion = sum(a.new_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def event(payload: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"
