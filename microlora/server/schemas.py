"""Request bodies of the HTTP API: OpenAI's shapes, plus microlora's own optional fields.

Unknown fields are rejected (400) rather than silently ignored, so a typo such as ``"kk": 4``
is caught. OpenAI fields that greedy decoding has no use for (temperature, top_p, seed,
penalties) are accepted and ignored, so stock clients work, and so are ``stop`` and
``logprobs`` at the "off" values clients send by default (null, [], false, 0); values whose
meaning microlora cannot honour (n > 1, stop sequences, logprobs, echo) are refused with a
message naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from microlora.core.config import Mode

MAX_K = 16
MAX_TOKENS = 256
MAX_DOCUMENTS = 256
MAX_PROMPTS = 16
# What the schema says of a question: a string with something besides white space. Said in
# the JSON schema only (the validators below refuse the rest with their own messages), so
# that clients, and requests made to fit the schema, send what is answered.
_QUESTION = {"type": "string", "pattern": r"\S"}
_OFF = {"type": "null"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


def _only_off(field: str, off: tuple, message: str) -> Any:
    """A validator letting through only null and the "off" values clients send by default
    for an OpenAI field microlora does not implement; anything else, of any type, gets
    ``message``, which names what is accepted (pydantic alone would answer a wrong type with
    one error per branch of the field's type, such as "Input should be None")."""
    def check(cls, v: Any) -> Any:
        if v is None or any(type(v) is type(o) and v == o for o in off):
            return v
        raise ValueError(message)
    return field_validator(field, mode="before")(classmethod(check))


class _Generation(_Strict):
    """Fields common to both completion endpoints."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one answer per prompt (decoding is greedy)")
    # accepted for compatibility, no effect on greedy decoding
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # accepted only when off (null, [], false, 0): clients send those by default
    stop: str | list[str] | None = Field(
        None, description="not supported (answers end at the QA stop pattern): null or []",
        json_schema_extra={"anyOf": [_OFF, {"const": ""}, {"type": "array", "maxItems": 0}]})
    logprobs: bool | int | None = Field(
        None, description="not supported: null, false or 0",
        json_schema_extra={"anyOf": [_OFF, {"const": False}, {"type": "integer", "const": 0}]})
    # microlora
    k: int | None = Field(None, ge=1, le=MAX_K, description="atoms composed per answer")
    mode: Mode | None = None
    namespaces: list[str] | None = Field(
        None, max_length=32,
        description="shared corpora to search (each must be granted to the key); the "
                    "caller's own namespace is always searched")

    _no_stop = _only_off("stop", ("", []), "stop sequences are not supported (answers end "
                         "at the QA stop pattern); send null or [], or leave it out")
    _no_logprobs = _only_off("logprobs", (False, 0), "logprobs are not supported; send null, "
                             "false or 0, or leave it out")


class CompletionRequest(_Generation):
    prompt: str | list[str] = Field(
        ..., description="a question, or a list of them",
        json_schema_extra={"anyOf": [_QUESTION, {"type": "array", "items": _QUESTION,
                                                 "minItems": 1, "maxItems": MAX_PROMPTS}]})
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None

    _no_echo = _only_off("echo", (False,), "echo is not supported; send false, or leave it out")
    _no_suffix = _only_off("suffix", (), "suffix is not supported; send null, or leave it out")
    _one_best = _only_off("best_of", (1,), "one answer per prompt (decoding is greedy); send 1 "
                          "or null, or leave it out")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or len(items) > MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
        if any(not p.strip() for p in items):
            raise ValueError("prompts must not be empty")
        return v


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: keep the text ones
            return " ".join(str(p.get("text", "")) for p in self.content
                            if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(
        ..., min_length=1, max_length=256,
        json_schema_extra={"contains": {"type": "object", "required": ["role", "content"],
                                        "properties": {"role": {"const": "user"},
                                                       "content": _QUESTION}}})
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)

    def question(self) -> str:
        """The last user message: what is answered (earlier turns are not composed in)."""
        for message in reversed(self.messages):
            if message.role == "user" and message.text().strip():
                return message.text()
        raise ValueError("messages need a non-empty user message")


class DocumentIn(_Strict):
    text: str = Field(..., max_length=4_000_000)
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}$")
    title: str = Field("", max_length=500)

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("binary content (NUL bytes): send UTF-8 text")
        if not v.strip():
            raise ValueError("empty document")
        return v


class DocumentsRequest(_Strict):
    documents: list[DocumentIn] = Field(..., min_length=1, max_length=MAX_DOCUMENTS)
