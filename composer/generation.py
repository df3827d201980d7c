"""Greedy decoding of a batch of prompts, cut where a stop pattern matches, optionally
streamed.

A plain loop over the model's forward with a KV cache rather than ``transformers``'
``generate``: a row leaves the batch the moment its answer ends (stop pattern or EOS), so one
rambling answer does not make every other row of the batch pay for its steps, which is what
decides throughput when a server batches many short answers. Whatever adapters are active on
the model apply; ``on_rows`` lets the caller shrink per-row state (the composed adapters)
in step with the batch.

An answer can also be decoded from several pieces of evidence at once (``ensemble``): one row
per piece, all following the same tokens, each token chosen by the weighted sum of the rows'
log-probabilities (a product of experts). The hybrid mode reads the passages in one row and
the composed adapters in another this way, rather than both in one row, where the adapters
disturb the reading.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from microlora.core.kv import new_cache

if TYPE_CHECKING:  # composer.prefix imports this module
    from composer.prefix import SharedPrefix


@dataclass
class Generated:
    text: str
    new_tokens: int  # tokens generated, including any that the stop pattern cut off
    finished: bool = True  # ended by the stop pattern or end-of-sequence, not max_new_tokens
    tokens: tuple[int, ...] = ()  # the ids generated (before the stop pattern's cut)


def encode_prompts(tokenizer, prompts: Sequence[str], device: torch.device,
                   chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and attention mask. BOS is added once (a chat template already
    writes it)."""
    bos = [] if chat or tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rows = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    pad = pad_id(tokenizer)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


@torch.inference_mode()
def continuation_logprobs(model, ids: torch.Tensor, mask: torch.Tensor,
                          continuations: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """log p(continuation | prompt) for each row of left-padded prompts (``ids``, ``mask``):
    the sum over the continuation's tokens, from one forward whose output layer runs on the
    last few positions only."""
    length = max(len(c) for c in continuations)
    rows = [[pad] * (length - len(c)) for c in continuations]
    ext = torch.tensor([r + list(c) for r, c in zip(rows, continuations)], device=ids.device)
    ext_mask = torch.tensor([[0] * len(r) + [1] * len(c) for r, c in zip(rows, continuations)],
                            device=ids.device)
    # the continuation right after its prompt: move each row's padding to the front
    full = torch.cat([ids, ext], 1)
    full_mask = torch.cat([mask, ext_mask], 1)
    scored = torch.cat([torch.zeros_like(mask), ext_mask], 1)  # the continuation's tokens
    order = torch.argsort(full_mask, dim=1, stable=True)  # zeros (padding) first
    full, full_mask, scored = (t.gather(1, order) for t in (full, full_mask, scored))
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with contiguous_output_layer(model):
        logits = model(input_ids=full, attention_mask=full_mask, position_ids=positions,
                       logits_to_keep=length + 1).logits[:, :-1].float()  # (N, length, V)
    logp = logits.log_softmax(-1).gather(-1, full[:, -length:, None])[..., 0]
    return (logp * scored[:, -length:]).sum(1)


@torch.inference_mode()
def generate(model, tokenizer, ids: torch.Tensor, mask: torch.Tensor, *,
             max_new_tokens: int = 32, stop: re.Pattern | None = None, min_new_tokens: int = 0,
             no_repeat_ngram: int = 0, end_ids: Sequence[int] = (),
             end_bias: float | torch.Tensor = 0.0, logit_bias: torch.Tensor | None = None,
             ensemble: Sequence[float] = (),
             gate: int | None = None,
             on_text: Callable[[int, str], None] | None = None,
             on_rows: Callable[[torch.Tensor], None] | None = None,
             prefix: SharedPrefix | None = None) -> list[Generated]:
    """Greedy continuation of each row, cut where ``stop`` first matches.

    ``min_new_tokens``: EOS is banned before then, and the stop pattern ignored (fixed-length
    decoding, for benchmarks). ``no_repeat_ngram`` > 0 forbids repeating an n-gram of the
    answer itself (not of the prompt, which an answer may quote). ``end_bias`` is added to the
    logits of ``end_ids`` (the tokens that end an answer) once an answer has begun, so a short
    answer stops rather than runs on (a float, or one value per row of ``ids``).
    ``logit_bias`` (rows of ``ids``, vocabulary) is added to every step's logits.
    ``on_text(row, piece)`` receives each row's answer piece by piece. ``on_rows(keep)`` is
    called with the indices (into the rows still decoding) that stay whenever some rows finish.
    ``prefix``: the prompts' shared prefix, whose unadapted blocks' states the prefill reuses
    (``composer.prefix``; the same logits, less work).

    ``ensemble``: G weights; ``ids`` is then G groups of N rows, row g*N + i answering
    question i from group g's evidence, and N answers come back, each token the argmax of
    sum_g weight_g * log p_g. ``gate``: the group whose confidence silences the others: at
    each step every other group's weight is scaled by 1 - (the gate row's top probability),
    so where that evidence is sure of its next token it decides alone.
    """
    groups = len(ensemble) or 1
    if len(ids) % groups:
        raise ValueError(f"an ensemble of {groups} needs {groups} rows per answer")
    rows = [_Row(tokenizer, stop, i, on_text) for i in range(len(ids) // groups)]
    weights = torch.tensor(ensemble, device=ids.device)[:, None, None] if ensemble else None
    end_bias = torch.as_tensor(end_bias, dtype=torch.float, device=ids.device).expand(len(ids))
    eos = sorted(_eos_ids(model, tokenizer))
    cache = new_cache(model)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with contiguous_output_layer(model):
        logits = None if prefix is None else prefix.prefill(model, ids, mask, positions, cache)
        if logits is None:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           use_cache=True, logits_to_keep=1, **cache).logits[:, -1]
    active = torch.arange(len(rows), device=ids.device)  # the answers still decoding
    last = positions[:, -1]
    for step in range(max_new_tokens):
        logits = logits.float()
        if step < min_new_tokens and eos:
            logits[:, eos] = float("-inf")
        if end_ids and step >= 1:
            logits[:, list(end_ids)] += end_bias[:, None]
        if logit_bias is not None:
            logits += logit_bias
        if weights is not None:
            logits = combine(logits.log_softmax(-1).view(groups, len(active), -1), weights,
                             gate)
        if no_repeat_ngram:
            _ban_repeats(logits, [rows[b].tokens for b in active.tolist()], no_repeat_ngram)
        tokens = logits.argmax(-1)
        done = []
        for j, (b, token) in enumerate(zip(active.tolist(), tokens.tolist())):
            if token in eos:
                rows[b].end(token)
                done.append(j)
            elif rows[b].add(token, check_stop=step + 1 >= min_new_tokens):
                done.append(j)
        if step == max_new_tokens - 1:
            break
        if done:
            keep = torch.tensor([j for j in range(len(active)) if j not in set(done)],
                                dtype=torch.long, device=ids.device)
            if len(keep) == 0:
                break
            active, tokens = active[keep], tokens[keep]
            keep = _all_rows(keep, groups, len(done) + len(keep))  # an answer's rows go together
            next(iter(cache.values())).batch_select_indices(keep)
            mask, last, end_bias = mask[keep], last[keep], end_bias[keep]
            logit_bias = None if logit_bias is None else logit_bias[keep]
            if on_rows is not None:
                on_rows(keep)
        tokens = tokens.repeat(groups)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        last = last + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last[:, None],
                       use_cache=True, **cache).logits[:, -1]
    return [row.result() for row in rows]


@contextmanager
def contiguous_output_layer(model) -> Iterator[None]:
    """The output layer fed a contiguous copy of the positions it keeps. transformers slices
    them out of the hidden states (``logits_to_keep``), a strided view, and for more than one
    row torch's matmul then multiplies by the weight expanded per row (a bmm): on one CPU
    thread, 16 rows took 0.92 s through Gemma 3 270M's 262k x 640 output layer that way and
    0.16 s as the one matrix product a contiguous input gets (its stand-in, fp32). A single
    row's slice is already "contiguous" (a dimension of size 1 has any stride), so
    ``.contiguous()`` keeps its strides, and with bf16 weights that one row took 750 ms
    through the output layer instead of 21 ms: the copy is made with the standard strides."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(
        lambda _m, args: (args[0].clone(memory_format=torch.contiguous_format), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def combine(logp: torch.Tensor, weights: torch.Tensor, gate: int | None = None
            ) -> torch.Tensor:
    """An ensemble's scores (N, V) from its groups' log-probabilities (G, N, V): the weighted
    sum, where with a ``gate`` every other group's weight is scaled by 1 - the gate row's top
    probability (a sure gate decides alone; a doubtful one lets the others in)."""
    w = weights.reshape(-1, 1, 1).to(logp.dtype)
    if gate is not None:
        doubt = 1 - logp[gate].max(-1, keepdim=True).values.exp()  # (N, 1)
        others = torch.arange(len(w), device=logp.device)[:, None, None] != gate
        w = torch.where(others, w * doubt[None], w)
    return (w * logp).sum(0)


class _Row:
    """One row's answer as it grows: its tokens, whether the stop pattern has matched, and
    what has been streamed of it."""

    def __init__(self, tokenizer, stop: re.Pattern | None, index: int,
                 on_text: Callable[[int, str], None] | None):
        self.tokenizer, self.stop, self.index, self.on_text = tokenizer, stop, index, on_text
        self.tokens: list[int] = []
        self.new_tokens = 0
        self.finished = False
        self.emitted = ""

    def add(self, token: int, check_stop: bool = True) -> bool:
        """Append a token; True once the answer has ended (the stop pattern matched)."""
        self.tokens.append(token)
        self.new_tokens += 1
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if check_stop and stop_index(text.lstrip(), self.stop) is not None:
            self.finished = True
        self._stream(text)
        return self.finished

    def end(self, _eos: int) -> None:
        self.new_tokens += 1
        self.finished = True
        self._stream(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def result(self) -> Generated:
        text = cut_at_stop(self.tokenizer.decode(self.tokens, skip_special_tokens=True),
                           self.stop)
        if self.on_text is not None and text.startswith(self.emitted) and \
                len(text) > len(self.emitted):
            self.on_text(self.index, text[len(self.emitted):])
        return Generated(text, self.new_tokens, self.finished, tuple(self.tokens))

    def _stream(self, text: str) -> None:
        """Pass on the text that is now certain: up to the stop match, without trailing
        whitespace (the answer is stripped) or a half-decoded character."""
        if self.on_text is None:
            return
        visible = cut_at_stop(text, self.stop) if self.finished else text.lstrip().rstrip()
        if visible.endswith("\ufffd"):
            return
        if visible.startswith(self.emitted) and len(visible) > len(self.emitted):
            self.on_text(self.index, visible[len(self.emitted):])
            self.emitted = visible


def _all_rows(answers: torch.Tensor, groups: int, n: int) -> torch.Tensor:
    """The batch rows of these answers, when each of n answers has a row in every group."""
    return torch.cat([answers + g * n for g in range(groups)])


def _ban_repeats(logits: torch.Tensor, answers: list[list[int]], n: int) -> None:
    """Ban the token that would repeat an n-gram of the row's own answer (``generate``'s
    ``no_repeat_ngram_size`` also counts the prompt, and would stop RAG answers from quoting
    their passage)."""
    for b, row in enumerate(answers):
        if len(row) < n:
            continue
        tail = row[len(row) - n + 1:]
        banned = [row[i + n - 1] for i in range(len(row) - n + 1) if row[i:i + n - 1] == tail]
        if banned:
            logits[b, banned] = float("-inf")


def cut_at_stop(text: str, stop: re.Pattern | None) -> str:
    """The answer: the text before the first match of ``stop`` (once the answer has begun:
    leading whitespace is skipped), stripped."""
    text = text.lstrip()
    at = stop_index(text, stop)
    return (text if at is None else text[:at]).strip()


def stop_index(text: str, stop: re.Pattern | None) -> int | None:
    m = stop.search(text) if stop is not None else None
    return m.start() if m else None


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
