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

from compiler.trainer import encode_targets, linear_cross_entropy
from microlora.lora import Adapter, MultiLoraModel, prepend_shared, stack_adapters
from microlora.models import BaseModel
from microlora.targets import TargetSpec


@dataclass(frozen=True)
class ReaderConfig:
    """rank: the reader's LoRA rank; lr, epochs, batch: Adam over the examples; targets: the
    atoms' targets (the default recipe's)."""

    rank: int = 8
    lr: float = 1e-3
    epochs: int = 4
    batch: int = 8
    seed: int = 0
    targets: TargetSpec = TargetSpec()


@dataclass
class ReaderExample:
    prompt: str  # the composer's prompt for the question, as it will be asked
    answer: str  # the text to produce after it (the answer and its line break)
    atoms: list[Adapter]  # the adapters composed beside the reader for this question


def train_reader(base: BaseModel, examples: Sequence[ReaderExample],
                 config: ReaderConfig = ReaderConfig(),
                 progress: Callable[[int, int, float], None] | None = None) -> Adapter:
    """Train the reader; returns its adapter (module -> (A (r, in), B (out, r)), fp32)."""
    if not examples:
        raise ValueError("the reader needs question/answer examples")
    torch.manual_seed(config.seed)
    lora = MultiLoraModel(base.model, config.targets)
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
                loss = _loss(base, lora, params, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if progress:
                    progress(step, steps, loss.item())
        return {name: (A.detach().cpu().clone(), B.detach().cpu().clone())
                for name, (A, B) in params.items()}
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


def _loss(base: BaseModel, lora: MultiLoraModel, params, batch: list[ReaderExample]) -> Tensor:
    """Mean cross-entropy of the answers, the reader composed beside each example's atoms."""
    ids, mask, tgt = encode_targets(base.tokenizer, [ex.answer for ex in batch],
                                    [ex.prompt for ex in batch], base.device)
    frozen = stack_adapters([ex.atoms for ex in batch], device=base.device) \
        if any(ex.atoms for ex in batch) else {}
    adapters = prepend_shared(frozen, params)
    with lora.adapters(adapters):
        hidden = base.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    pos = tgt[:, 1:].nonzero()
    h = hidden[pos[:, 0], pos[:, 1]]
    labels = ids[pos[:, 0], pos[:, 1] + 1]
    softcap = getattr(base.model.config, "final_logit_softcapping", None)
    return linear_cross_entropy(h, base.model.get_output_embeddings().weight, labels,
                                softcap).mean()
