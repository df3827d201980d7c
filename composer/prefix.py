"""Prompt-prefix reuse: every request's prompt begins with the same text (the two-shot QA
examples), and in the blocks below the first adapted one that text's keys, values and hidden
states are the same whatever atoms a request composes. ``PrefixCache`` computes them once per
(model, prefix) and each batch's prefill reuses them: the adapted blocks run over the prefix
(its atoms change them), every block over the request's own suffix. On 2 CPU cores the prefill
of short answers' prompts is most of the work (benchmarks/RESULTS.md, "Serve").

Exact by construction, not by tolerance: a row reuses only the columns whose token ids equal
the cached prefix's, at the same positions. The batch keeps the left-padded layout of a plain
prefill (``generation.encode_prompts``): columns [0, C) come from the cache, each row's
entries shifted right by its padding (the padding's own slots are masked, so what fills them
does not matter), and columns [C, width) run through every block as usual. Left padding keeps
a sliding window over the same tokens as a row alone would see (padding in the middle of a
row would not), and positions come from the mask, as in ``generate``. The same idea trains
atoms (``compiler.replay.FrozenPrefix``); the import contract keeps the two apart.

Assumed: the base weights below the first adapted block do not change while entries live
(adapters, stacked or merged, only ever move the blocks they sit in: those are recomputed).
Anything else that edits the weights must call ``clear()``.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from composer.generation import encode_prompts
from composer.prompts import build_prompt, uses_chat
from microlora.core.kernel import MultiLoraLinear
from microlora.core.kv import cache_keyword
from microlora.core.targets import find_blocks

log = logging.getLogger(__name__)

# Two probe prompts that differ from their first character on: the text before the
# difference is what every prompt of a template shares.
_PROBES = (("Alpha?", "Alpha."), ("Zulu!", "Zulu,"))


@dataclass
class _Entry:
    """One prefix's states from the unadapted blocks, for a batch of one (P prefix tokens)."""

    ids: Tensor  # (P,)
    depth: int  # blocks whose keys and values are held: [0, depth)
    keys: list[Tensor]  # per block (1, kv_heads, P, head_dim)
    values: list[Tensor]
    hidden: list[Tensor]  # per block up to ``depth`` (1, P, d): the states entering it
    tensor_blocks: bool  # the blocks return a tensor (older transformers: a tuple)


class PrefixCache:
    """Keys, values and hidden states of shared prompt prefixes in the unadapted blocks of one
    model, computed once and reused by every batch's prefill (``SharedPrefix``).

    ``max_entries`` prefixes are kept (least recently used dropped): one per prompt template
    and passage setting in use. ``captures`` counts the prefix forwards run (the tests read
    it). Entries are for one model, on one device and dtype: another model (or the same moved)
    drops them all.
    """

    def __init__(self, max_entries: int = 4, min_tokens: int = 8):
        self.max_entries, self.min_tokens = max_entries, min_tokens
        self.captures = 0
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._model: weakref.ref | None = None
        self._placement: tuple[torch.device, torch.dtype] | None = None
        self._templates: dict[tuple, tuple[int, ...]] = {}

    def clear(self) -> None:
        """Forget every entry (the model's weights changed under it)."""
        self._entries.clear()
        self._templates.clear()

    def for_prompts(self, tokenizer, template: str, passages: bool,
                    adapted: bool = True) -> SharedPrefix:
        """The prefix every prompt of ``template`` (with passages, or without) begins with;
        ``adapted=False``: the base model alone reads it, in every block."""
        key = (id(tokenizer), template, passages)
        if key not in self._templates:
            self._templates[key] = template_prefix(tokenizer, template, passages)
        return SharedPrefix(self, self._templates[key], adapted)

    # -- the prefill -------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, model: nn.Module, prefix_ids: Sequence[int], ids: Tensor, mask: Tensor,
                positions: Tensor, cache: dict[str, DynamicCache],
                adapted: bool = True) -> Tensor | None:
        """The last position's logits (N, V) of left-padded prompts, with ``cache`` filled as
        a plain prefill fills it; None (``cache`` untouched) where the prefix cannot serve:
        too few columns shared, adapters in the first block, padding not on the left, or a
        transformers whose caches and blocks this module does not know (before 4.56 or so:
        no ``DynamicCache.layers``, blocks that return tuples). ``adapted=False``: the prefix's
        states come from the base model alone in every block (the adapters, stacked, act on
        the rest of each prompt only), so nothing of the prefix is recomputed."""
        (store,) = cache.values()
        if len(prefix_ids) < self.min_tokens or len(ids) == 0 or not hasattr(store, "layers"):
            return None
        _, blocks = find_blocks(model)
        first = first_adapted_block(model, blocks)
        if not adapted and not any(m.merged for m in _kernels(model)):
            first = len(blocks)  # merged weights cannot leave the prefix: adapt it all
        if first == 0 or not bool((mask[:, :-1] <= mask[:, 1:]).all()):
            return None
        prefix = torch.tensor(prefix_ids, device=ids.device)
        pad = (mask == 0).sum(1)  # (N,) leading padding of each row
        split = shared_columns(ids, pad, prefix)
        if split < self.min_tokens:
            return None
        entry = self._entry(model, blocks, prefix, first)
        if not entry.tensor_blocks:
            return None
        where = (torch.arange(split, device=ids.device) - pad[:, None]).clamp(min=0)  # (N, C)
        if first < len(blocks):  # the adapted blocks over the prefix, from the cached states
            with _skipping(blocks, first, entry.hidden[first][0, where]):
                model.base_model(input_ids=ids[:, :split], attention_mask=mask[:, :split],
                                 position_ids=positions[:, :split], use_cache=True,
                                 **{cache_keyword(model.base_model): store})
        for i in range(first):  # (1, kv, P, hd) -> each row's (kv, C, hd), shifted by its pad
            store.update(entry.keys[i][0][:, where].transpose(0, 1),
                         entry.values[i][0][:, where].transpose(0, 1), i)
        # kept off the prefix: a padded row's last prefix tokens fall past ``split``
        keep = None if first < len(blocks) else \
            torch.arange(split, ids.shape[1], device=ids.device) - pad[:, None] >= len(prefix)
        with _adapting_only(model, keep):
            return model(input_ids=ids[:, split:], attention_mask=mask,
                         position_ids=positions[:, split:], use_cache=True, logits_to_keep=1,
                         **cache).logits[:, -1]

    def _entry(self, model: nn.Module, blocks: nn.ModuleList, prefix: Tensor,
               depth: int) -> _Entry:
        """The cached states of ``prefix`` at least ``depth`` blocks deep, captured now if
        missing (or too shallow: a batch whose adapters start higher)."""
        param = next(model.parameters())
        placement = (param.device, param.dtype)
        if self._model is None or self._model() is not model or self._placement != placement:
            self.clear()
            self._model, self._placement = weakref.ref(model), placement
        key = tuple(prefix.tolist())
        entry = self._entries.get(key)
        if entry is None or entry.depth < depth:
            entry = self._entries[key] = self._capture(model, blocks, prefix, depth)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return entry

    def _capture(self, model: nn.Module, blocks: nn.ModuleList, prefix: Tensor,
                 depth: int) -> _Entry:
        """One forward of the prefix alone that stops where the adapted blocks begin."""
        self.captures += 1
        store = DynamicCache()  # no config: sliding layers keep every prefix token here
        hidden: list[Tensor] = []

        def grab(_module, args, kwargs):
            hidden.append(args[0] if args else kwargs["hidden_states"])
            if len(hidden) > depth:
                raise _Stop

        hooks = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in blocks[:depth + 1]]
        returned: list[bool] = []
        hooks.append(blocks[0].register_forward_hook(
            lambda _m, _args, out: returned.append(isinstance(out, Tensor))))
        ids = prefix[None]
        try:
            with _without_adapters(model):  # the prefix's own states: the base model's
                model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 position_ids=torch.arange(len(prefix), device=ids.device)[None],
                                 use_cache=True, **{cache_keyword(model.base_model): store})
        except _Stop:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        layers = store.layers[:depth]
        log.debug("prefix of %d tokens captured through %d blocks", len(prefix), depth)
        return _Entry(prefix, depth, [la.keys for la in layers], [la.values for la in layers],
                      hidden, all(returned))


@dataclass(frozen=True)
class SharedPrefix:
    """A prefix to reuse in ``generate``'s prefill: the cache and the prefix's token ids."""

    cache: PrefixCache
    ids: tuple[int, ...]
    adapted: bool = True  # the adapters act on the prefix too (False: the base model alone)

    def prefill(self, model: nn.Module, ids: Tensor, mask: Tensor, positions: Tensor,
                cache: dict[str, DynamicCache]) -> Tensor | None:
        return self.cache.prefill(model, self.ids, ids, mask, positions, cache, self.adapted)


def template_prefix(tokenizer, template: str, passages: bool) -> tuple[int, ...]:
    """The token ids every prompt of ``template`` begins with: the text two probe prompts
    share, encoded as ``encode_prompts`` encodes a prompt, less its last token (which may
    merge with a question's first characters; ``shared_columns`` checks each row anyway)."""
    texts = [build_prompt(tokenizer, question, [passage] if passages else (), template)
             for question, passage in _PROBES]
    n = 0
    while n < min(map(len, texts)) and texts[0][n] == texts[1][n]:
        n += 1
    ids, _ = encode_prompts(tokenizer, [texts[0][:n]], torch.device("cpu"),
                            chat=uses_chat(tokenizer, template))
    return tuple(ids[0, :-1].tolist())


def shared_columns(ids: Tensor, pad: Tensor, prefix: Tensor) -> int:
    """How many leading columns of the left-padded batch ``ids`` every row can take from the
    cache: padding, then the tokens equal to the prefix's at the same position; at most all
    but the last column (whose logits the prefill returns)."""
    width = ids.shape[1]
    at = torch.arange(width, device=ids.device) - pad[:, None]  # (N, W) index into the prefix
    inside = (at >= 0) & (at < len(prefix))
    same = inside & (ids == prefix[at.clamp(0, len(prefix) - 1)])
    bad = ~(same | (at < 0))  # padding always "matches"
    first_bad = torch.where(bad.any(1), bad.int().argmax(1), width)
    return int(min(int(first_bad.min()), width - 1))


def first_adapted_block(model: nn.Module, blocks: nn.ModuleList) -> int:
    """The index of the lowest block with an adapter active (stacked or merged) in one of its
    linears; len(blocks) when none is; 0 when a linear outside the blocks (other than the
    output layer) carries one, so that nothing is reused."""
    active = [m for m in _kernels(model) if m.lora_A is not None or m.merged]
    block_of = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    output = model.get_output_embeddings()
    first = len(blocks)
    for m in active:
        if id(m) in block_of:
            first = min(first, block_of[id(m)])
        elif m is not output and m.base_layer is not output:
            return 0
    return first


def _kernels(model: nn.Module) -> list[MultiLoraLinear]:
    return [m for m in model.modules() if isinstance(m, MultiLoraLinear)]


@contextmanager
def _without_adapters(model: nn.Module) -> Iterator[None]:
    """The stacked adapters set aside (a capture reads the base model's own states)."""
    held = [(m, m.lora_A, m.lora_B) for m in _kernels(model) if m.lora_A is not None]
    for m, _, _ in held:
        m.clear_adapter()
    try:
        yield
    finally:
        for m, A, B in held:
            m.lora_A, m.lora_B = A, B


@contextmanager
def _adapting_only(model: nn.Module, keep: Tensor | None) -> Iterator[None]:
    """The stacked adapters act only where ``keep`` (N, T) is true, for one forward."""
    kernels = [] if keep is None else [m for m in _kernels(model) if m.lora_A is not None]
    for m in kernels:
        m.token_mask = keep
    try:
        yield
    finally:
        for m in kernels:
            m.token_mask = None


@contextmanager
def _skipping(blocks: nn.ModuleList, first: int, hidden: Tensor) -> Iterator[None]:
    """Blocks [0, first) skipped: the first returns ``hidden`` (the states entering block
    ``first``), the rest pass it on."""
    originals = [blocks[i] for i in range(first)]
    for i in range(first):
        blocks[i] = _Skipped(hidden if i == 0 else None)
    try:
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


class _Stop(Exception):
    pass


class _Skipped(nn.Module):
    """Stands in for an unadapted block over the prefix: returns the cached states."""

    def __init__(self, hidden: Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states if self.hidden is None else self.hidden
