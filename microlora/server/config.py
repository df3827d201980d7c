"""The server's limits and defaults: the face's config, made of every stage's (``microlora
serve`` reads its option defaults from it). Torch-free, like ``microlora.core.config``."""

from __future__ import annotations

from dataclasses import dataclass

from microlora.core.config import (
    MAX_NAMESPACES,
    AskConfig,
    ChunkConfig,
    StoreConfig,
    TrainConfig,
)
from microlora.core.errors import MicroloraError


@dataclass(frozen=True)
class ServeConfig:
    """Server limits and defaults (``microlora serve`` options).

    max_body_bytes: any request body; max_upload_bytes: files uploaded to
    ``POST /v1/documents`` (multipart), which outgrow JSON (a PDF with figures runs to tens of
    MiB).
    max_prompt_tokens: the longest question a request may ask, in base-model tokens (a prompt
    of 16 characters per token more is refused without tokenizing it). Far below the model's
    context: a batch waits for its longest prefill, and 32k tokens on 2 CPU cores stall
    every request batched with it, or ask for more memory than there is.
    """

    max_batch: int = 16
    max_body_bytes: int = 8 << 20
    max_upload_bytes: int = 64 << 20
    max_prompt_tokens: int = 2048
    max_namespaces: int = MAX_NAMESPACES  # one per user with documents, plus shared corpora
    max_jobs_per_user: int = 4  # compile jobs queued or running per namespace (more: 429)
    jobs_kept: int = 1000  # ended jobs still answered by GET /v1/jobs/ID (the newest)
    # seconds a stopping server waits for a compile batch that is training; then the batch is
    # not written, and its job (stored, like the queued ones) resumes on the next start
    stop_wait_s: float = 5.0
    ask: AskConfig = AskConfig()  # defaults for k, mode, max_tokens
    train: TrainConfig = TrainConfig()  # the recipe for uploaded documents
    chunk: ChunkConfig = ChunkConfig()
    store: StoreConfig = StoreConfig()  # background_verify: checksums hashed ahead of questions

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 1:
            raise MicroloraError("--max-prompt-tokens must be at least 1")
        if self.stop_wait_s < 0:
            raise MicroloraError("ServeConfig.stop_wait_s must be 0 or more seconds")
