"""The reader: one shared adapter per base model (and store) that teaches the model to answer a
question from whatever atom adapters are composed beside it.

Atom adapters are trained to reproduce their sentence, so asked a question they tend to recite
or loop rather than answer. The reader (PRAG's "warm-up" idea) is a small LoRA trained on
question/answer pairs with the retrieved atoms' adapters composed, frozen, beside it, the loss
on the answer and the line break that ends it, so it learns the skill (read the composed
atoms, answer briefly, stop), not the facts: its questions come from data disjoint from any
evaluation, and at query time it is composed into every request that uses adapters.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from compiler.loss import OutputHead, encode_targets, target_states
from microlora.core.config import ReaderConfig
from microlora.core.kernel import MultiLoraModel
from microlora.core.models import BaseModel
from microlora.core.pack import Packed, compose, concat


@dataclass
class ReaderExample:
    prompt: str  # the composer's prompt for the question, as it will be asked
    answer: str  # the text to produce after it (the answer and its line break)
    atoms: list[Packed]  # the adapters composed beside the reader for this question


def train_reader(base: BaseModel, examples: Sequence[ReaderExample],
                 config: ReaderConfig = ReaderConfig(),
                 progress: Callable[[int, int, float], None] | None = None) -> Packed:
    """Train the reader; returns its adapter (fp32)."""
    if not examples:
        raise ValueError("the reader needs question/answer examples")
    torch.manual_seed(config.seed)
    lora = MultiLoraModel(base.model, config.targets)
    head = OutputHead.of(base.model)
    try:
        params = _init(lora.shapes(), config.rank, base.device)
        opt = torch.optim.Adam([p for pair in params.values() for p in pair], lr=config.lr)
        order = list(range(len(examples)))
        rng = random.Random(config.seed)
        steps = config.epochs * math.ceil(len(examples) / config.batch)
        step = 0
        for _ in range(config.epochs):
            rng.shuffle(order)
            for start in range(0, len(order), config.batch):
                batch = [examples[i] for i in order[start:start + config.batch]]
                loss = _loss(base, lora, head, params, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if progress:
                    progress(step, steps, loss.item())
        return Packed.of({name: (A.detach().cpu(), B.detach().cpu())
                          for name, (A, B) in params.items()})
    finally:
        lora.remove()


def _init(shapes: dict[str, tuple[int, int]], rank: int, device) -> dict[str, tuple]:
    """PEFT's init: A uniform in +-1/sqrt(in), B zero (the reader starts as a no-op)."""
    out = {}
    for name, (d_in, d_out) in shapes.items():
        g = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
        bound = 1 / math.sqrt(d_in)
        A = (torch.rand(rank, d_in, generator=g) * 2 - 1) * bound
        out[name] = (nn.Parameter(A.to(device)), nn.Parameter(torch.zeros(d_out, rank,
                                                                          device=device)))
    return out


def _loss(base: BaseModel, lora: MultiLoraModel, head: OutputHead, params,
          batch: list[ReaderExample]) -> Tensor:
    """Mean cross-entropy of the answers, the reader composed beside each example's atoms."""
    ids, mask, tgt = encode_targets(base.tokenizer, [ex.answer for ex in batch],
                                    [ex.prompt for ex in batch], base.device)
    frozen = compose([ex.atoms for ex in batch], device=base.device)
    reader = {name: (A[None], B[None]) for name, (A, B) in params.items()}
    with lora.adapters(concat(reader, frozen)):
        hidden = base.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    h, labels, _ = target_states(hidden, ids, tgt)
    return head.cross_entropy(h, labels)[0].mean()
