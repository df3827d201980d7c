"""Greedy decoding of a batch of prompts with ``transformers``' ``generate``, cut where a
stop pattern matches, optionally streamed.

Whatever adapters are active on the model (per-sample stacked ones, or a merge) apply: this
module only turns prompts into text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer


@dataclass
class Generated:
    text: str
    new_tokens: int  # tokens generated, including any that the stop pattern cut off
    finished: bool = True  # ended by the stop pattern or end-of-sequence, not max_new_tokens


def encode_prompts(tokenizer, prompts: Sequence[str], device: torch.device,
                   chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and attention mask. BOS is added once (a chat template already
    writes it)."""
    bos = [] if chat or tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rows = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    pad = _pad_id(tokenizer)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def generate(model, tokenizer, ids: torch.Tensor, mask: torch.Tensor, *,
             max_new_tokens: int = 32, stop: re.Pattern | None = None, min_new_tokens: int = 0,
             no_repeat_ngram: int = 0,
             on_text: Callable[[int, str], None] | None = None) -> list[Generated]:
    """Greedy continuation of each row, cut where ``stop`` first matches. ``no_repeat_ngram``
    > 0 forbids repeating an n-gram of the answer itself (not of the prompt, which an answer may
    quote). ``on_text(row, piece)`` receives each row's answer piece by piece as it is
    decoded (every row of the batch streams at once)."""
    kwargs = {}
    if stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [_StopOnText(tokenizer, stop, ids.shape[1])])
    if on_text is not None:
        kwargs["streamer"] = _BatchStreamer(tokenizer, stop, on_text)
    if no_repeat_ngram:
        kwargs["logits_processor"] = LogitsProcessorList(
            [_NoRepeatInAnswer(no_repeat_ngram, ids.shape[1])])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             pad_token_id=_pad_id(tokenizer), **kwargs)
    results = []
    trailing = _eos_ids(model, tokenizer) | {_pad_id(tokenizer)}
    for row in out[:, ids.shape[1]:].tolist():
        n = len(row)
        while row and row[-1] in trailing:
            row = row[:-1]
        text = tokenizer.decode(row, skip_special_tokens=True)
        ended = len(row) < n or stop_index(text.lstrip(), stop) is not None
        results.append(Generated(cut_at_stop(text, stop), n, ended))
    if on_text is not None:
        kwargs["streamer"].close()
    return results


def cut_at_stop(text: str, stop: re.Pattern | None) -> str:
    """The answer: the text before the first match of ``stop`` (once the answer has begun:
    leading whitespace is skipped), stripped."""
    text = text.lstrip()
    at = stop_index(text, stop)
    return (text if at is None else text[:at]).strip()


def stop_index(text: str, stop: re.Pattern | None) -> int | None:
    m = stop.search(text) if stop is not None else None
    return m.start() if m else None


class _StopOnText(StoppingCriteria):
    """Stops each row once its new text matches the stop pattern. (``generate``'s own
    ``stop_strings`` takes no patterns and needs a byte-level or SentencePiece vocabulary; this
    works with any tokenizer, at the cost of decoding the few new tokens of each row per
    step.)"""

    def __init__(self, tokenizer, stop: re.Pattern, prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:],
                                            skip_special_tokens=True)
        done = [stop_index(t.lstrip(), self.stop) is not None for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _NoRepeatInAnswer(LogitsProcessor):
    """Bans the token that would repeat an n-gram of the generated text (``generate``'s own
    ``no_repeat_ngram_size`` also counts the prompt, and would stop RAG answers from quoting
    their passage)."""

    def __init__(self, n: int, prompt_length: int):
        self.n, self.prompt_length = n, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n = self.n
        for b, row in enumerate(input_ids[:, self.prompt_length:].tolist()):
            if len(row) < n:
                continue
            tail = row[len(row) - n + 1:]
            banned = [row[i + n - 1] for i in range(len(row) - n + 1) if row[i:i + n - 1] == tail]
            if banned:
                scores[b, banned] = float("-inf")
        return scores


class _BatchStreamer(BaseStreamer):
    """Streams every row of a batch: ``generate`` hands over one new token per row per step;
    each row's text so far is decoded and whatever became visible is passed on, up to the
    first stop match. (transformers' ``TextStreamer`` takes a batch of one only.)"""

    def __init__(self, tokenizer, stop: re.Pattern | None,
                 on_text: Callable[[int, str], None]):
        self.tokenizer, self.stop, self.on_text = tokenizer, stop, on_text
        self.tokens: list[list[int]] | None = None  # None until the prompt has gone by
        self.emitted: list[int] = []
        self.stopped: list[bool] = []

    def put(self, value: torch.Tensor) -> None:
        if self.tokens is None:  # the first call carries the prompt
            rows = value.shape[0] if value.dim() > 1 else 1
            self.tokens, self.emitted, self.stopped = [[] for _ in range(rows)], \
                [0] * rows, [False] * rows
            return
        for b, token in enumerate(value.reshape(-1).tolist()):
            if self.stopped[b]:
                continue
            self.tokens[b].append(token)
            text = self.tokenizer.decode(self.tokens[b], skip_special_tokens=True)
            visible = text.lstrip()
            cut = stop_index(visible, self.stop)
            if cut is not None:
                visible, self.stopped[b] = visible[:cut].rstrip(), True
            elif visible.endswith("\ufffd"):  # half a character: wait for the rest
                continue
            if len(visible) > self.emitted[b]:
                self.on_text(b, visible[self.emitted[b]:])
                self.emitted[b] = len(visible)

    def end(self) -> None:
        self.stopped = [True] * len(self.stopped)

    def close(self) -> None:
        self.end()


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
