"""The training loss of atoms (and of the reader): cross-entropy on target tokens only,
computed from hidden states without ever materialising (rows, vocabulary) logits for a batch.

- ``encode_targets`` lays out rows as BOS + context (read only) + text (the targets);
- ``OutputHead`` is the frozen output layer (in the training dtype, with Gemma's soft cap);
- ``linear_cross_entropy`` applies it a few hundred rows at a time and forms the gradient in
  the same pass, so nothing vocabulary-sized is kept or recomputed;
- ``CandidateVocab`` restricts training to the base model's likely tokens plus the targets;
- ``token_losses`` gives each target token's training loss and cross-entropy; ``atom_scores``
  reduces them to per-atom ones, re-scoring with the full softmax whatever decides that an
  atom has learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# target positions per vocabulary-wide chunk: 64 x 262k fp32 logits is 67 MB; at 256 (268 MB)
# the chunks' buffers set a compile's peak, 358 MB higher (benchmarks/RESULTS.md)
LOSS_CHUNK_ROWS = 64


def encode_targets(tokenizer, texts: Sequence[str], contexts: Sequence[str] | None,
                   device: torch.device, *, bos: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """BOS + context + text per row, right-padded: input ids (B, T), attention mask (B, T) and
    target mask (B, T): which positions are predicted (each text's tokens, not its BOS or
    context, which is only read). ``bos=False``: rows that continue a cached prefix."""
    rows, targets = [], []
    bos = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    for i, text in enumerate(texts):
        ctx = tokenizer(contexts[i], add_special_tokens=False)["input_ids"] \
            if contexts and contexts[i] else []
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append(bos + ctx + body)
        targets.append([0] * (len(bos) + len(ctx)) + [1] * len(body))
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    tgt = torch.tensor([t + [0] * (width - len(t)) for t in targets], dtype=torch.bool)
    return ids.to(device), mask.to(device), tgt.to(device)


def left_padded(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Right-padded rows moved to the right edge, so every row's last token is in the last
    column (what a continuation from their keys and values needs)."""
    width = ids.shape[1]
    shift = width - mask.sum(1, keepdim=True)
    index = (torch.arange(width, device=ids.device) - shift) % width
    return ids.gather(1, index), mask.gather(1, index)


def target_states(hidden: Tensor, ids: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(states (n, d), labels (n,), row of each (n,)): the hidden states that predict a target
    token, and that token."""
    pos = tgt[:, 1:].nonzero()  # (n, 2): rows b, positions t whose next token is a target
    return hidden[pos[:, 0], pos[:, 1]], ids[pos[:, 0], pos[:, 1] + 1], pos[:, 0]


@dataclass(frozen=True)
class OutputHead:
    """The frozen output layer (V, d), converted once to the dtype training computes in."""

    weight: Tensor
    softcap: float | None = None

    @classmethod
    def of(cls, model: nn.Module, bf16: bool = False) -> OutputHead:
        weight = model.get_output_embeddings().weight.detach()
        if bf16 and weight.dtype != torch.bfloat16:
            weight = weight.to(torch.bfloat16)
        return cls(weight, getattr(model.config, "final_logit_softcapping", None))

    def cross_entropy(self, h: Tensor, labels: Tensor, soft: SoftTargets | None = None
                      ) -> tuple[Tensor, Tensor]:
        """Per-row (training loss, label cross-entropy) over the whole vocabulary."""
        return linear_cross_entropy(h, self.weight, labels, self.softcap, soft)

    @torch.no_grad()
    def top(self, h: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k likeliest tokens per row and their probabilities (full softmax): (n, k) each."""
        ids, probs = [], []
        for i in range(0, len(h), LOSS_CHUNK_ROWS):
            logits, _ = _capped_logits(h[i:i + LOSS_CHUNK_ROWS], self.weight, self.softcap)
            top = logits.topk(k)
            ids.append(top.indices)
            probs.append((top.values - logsumexp_(logits)[:, None]).exp())
        return torch.cat(ids), torch.cat(probs)


@dataclass(frozen=True)
class CandidateVocab:
    """Sorted token ids: the base model's top N tokens at each target position, plus every
    target. The adapters move probability onto the targets, which are in it, and the
    strongest competitors are there too; the other ~260k tokens carry little mass and cost
    most of the time."""

    ids: Tensor  # (V_c,) sorted
    weight: Tensor  # (V_c, d): the head's rows for them, gathered once per batch

    @classmethod
    @torch.no_grad()
    def of(cls, head: OutputHead, h: Tensor, labels: Tensor, n: int) -> CandidateVocab:
        weight = head.weight
        top = torch.cat([(h[i:i + LOSS_CHUNK_ROWS].to(weight.dtype) @ weight.T).topk(n).indices
                         for i in range(0, len(h), LOSS_CHUNK_ROWS)])
        ids = torch.unique(torch.cat([top.reshape(-1), labels]))
        # in the dtype the states come in: an fp32 base may hold its output layer in bf16
        # (``core.models.hold_vocabulary_in_bf16``), and its training steps stay fp32
        return cls(ids, weight[ids].to(h.dtype))

    def cross_entropy(self, h: Tensor, labels: Tensor, softcap: float | None,
                      soft: SoftTargets | None = None) -> tuple[Tensor, Tensor]:
        return linear_cross_entropy(h, self.weight, torch.searchsorted(self.ids, labels),
                                    softcap, None if soft is None else soft.mapped(self.ids))


def token_losses(h: Tensor, labels: Tensor, head: OutputHead, vocab: CandidateVocab | None,
                 soft: SoftTargets | None = None) -> tuple[Tensor, Tensor]:
    """Per target token: the training loss (with a gradient; over the candidate ``vocab``
    when there is one, distilling towards ``soft`` targets when given) and the label
    cross-entropy under the same softmax (no gradient)."""
    return head.cross_entropy(h, labels, soft) if vocab is None else \
        vocab.cross_entropy(h, labels, head.softcap, soft)


def atom_scores(h: Tensor, labels: Tensor, ce: Tensor, atoms: Tensor, n_atoms: int,
                head: OutputHead, vocab: CandidateVocab | None, stop_prob: float, last: bool,
                decides: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per atom (``atoms`` maps each target to its atom): the scored loss (mean label
    cross-entropy over all its targets) and the smallest probability among the targets that
    ``decides`` marks (all by default), from ``token_losses``' ``ce``.

    With a candidate ``vocab``, atoms that look learned under it, and every atom on the
    ``last`` step, are re-scored with the full softmax (the candidate one flatters: its
    denominator is smaller), so whether an atom stops, and the loss recorded for it, always
    come from the full softmax (and read the labels, not a teacher's targets)."""
    if decides is None:
        decides = torch.ones_like(atoms, dtype=torch.bool)

    def smallest(ce: Tensor, atoms: Tensor, decides: Tensor) -> Tensor:
        return torch.exp(-per_atom(ce[decides], atoms[decides], n_atoms, "amax"))

    scored = per_atom(ce, atoms, n_atoms, "mean")
    min_prob = smallest(ce, atoms, decides)
    if vocab is not None:
        rescore = torch.ones_like(min_prob, dtype=torch.bool) if last else min_prob > stop_prob
        if rescore.any():
            rows = rescore[atoms]
            with torch.no_grad():
                _, full = head.cross_entropy(h[rows].detach(), labels[rows])
            scored = torch.where(rescore, per_atom(full, atoms[rows], n_atoms, "mean"), scored)
            min_prob = torch.where(rescore, smallest(full, atoms[rows], decides[rows]), min_prob)
    return scored, min_prob.cpu()


def per_atom(values: Tensor, atoms: Tensor, n: int, how: str) -> Tensor:
    """Reduce per-row values to per-atom values (mean or max over each atom's rows)."""
    out = torch.zeros(n, device=values.device, dtype=values.dtype)
    if how == "mean":
        count = torch.zeros(n, device=values.device).index_add_(0, atoms, torch.ones_like(values))
        return out.index_add(0, atoms, values) / count.clamp(min=1)
    return out.scatter_reduce(0, atoms, values, "amax", include_self=False)


def linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor,
                         softcap: float | None = None, soft: SoftTargets | None = None
                         ) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy of ``h @ weight.T`` against ``labels``, computed in row chunks
    with the gradient w.r.t. ``h`` formed in the same pass (softmax minus the target
    distribution, times the weight), so neither the (rows, vocab) logits nor a recomputation
    are ever kept: two vocabulary-sized matmuls per row instead of three. ``weight`` is frozen.

    With ``soft`` targets the loss (and its gradient) is the cross-entropy against
    ``soft.probs`` on ``soft.ids`` (indices into ``weight``'s rows) plus the rest of the
    unit mass on the label: distillation towards a teacher's share of the target, which
    differs from the KL to that mixture by its constant entropy. Returns (training loss,
    label cross-entropy): the second, without a gradient, decides whether a row is learned."""
    return _LinearCrossEntropy.apply(h, weight, labels, softcap, soft)


@dataclass(frozen=True)
class SoftTargets:
    """A teacher's share of each row's target: tokens (n, K) and the mass on each (n, K),
    summing to at most 1; the rest of the row's target is its label. A row the teacher
    does not speak for has zero mass."""

    ids: Tensor
    probs: Tensor

    def rows(self, index: Tensor) -> SoftTargets:
        return SoftTargets(self.ids[index], self.probs[index])

    def mapped(self, vocab: Tensor) -> SoftTargets:
        """The same targets as indices into ``vocab`` (sorted ids that contain them all)."""
        return SoftTargets(torch.searchsorted(vocab, self.ids), self.probs)


def logsumexp_(logits: Tensor) -> Tensor:
    """``torch.logsumexp(logits, -1)`` computed in ``logits``' own memory, which it overwrites:
    a chunk's second vocabulary-wide fp32 buffer (logsumexp's temporary) was a compile's peak
    resident memory (benchmarks/RESULTS.md, "Compile memory")."""
    top = logits.amax(dim=-1, keepdim=True)
    return logits.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))


def _capped_logits(h: Tensor, weight: Tensor, softcap: float | None
                   ) -> tuple[Tensor, Tensor | None]:
    """fp32 logits of ``h @ weight.T`` with Gemma's soft cap applied, and the cap's tanh (for
    the gradient; None without a cap)."""
    logits = (h.to(weight.dtype) @ weight.T).float()
    if not softcap:
        return logits, None
    t = torch.tanh(logits / softcap)
    return t * softcap, t


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, softcap: float | None,
                soft: SoftTargets | None):
        losses = torch.empty(len(h), dtype=torch.float32, device=h.device)
        gold = torch.empty_like(losses)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) \
            if h.requires_grad else None
        rows = torch.arange(len(h), device=h.device)
        for i in range(0, len(h), LOSS_CHUNK_ROWS):
            hc, yc, r = h[i:i + LOSS_CHUNK_ROWS], labels[i:i + LOSS_CHUNK_ROWS], \
                rows[:min(LOSS_CHUNK_ROWS, len(h) - i)]
            logits, t = _capped_logits(hc, weight, softcap)  # (rows, vocab)
            at_label = logits[r, yc]
            if soft is not None:
                ids, probs = soft.ids[i:i + len(hc)], soft.probs[i:i + len(hc)]
                at_soft = logits.gather(1, ids)
            # without a gradient to form, the logits are spent once their logsumexp is taken
            lse = torch.logsumexp(logits, dim=-1) if grad_h is not None else logsumexp_(logits)
            loss = lse - at_label
            gold[i:i + len(hc)] = loss
            keep = 1.0
            if soft is not None:
                keep = 1.0 - probs.sum(1)
                loss = keep * loss + (probs * (lse[:, None] - at_soft)).sum(1)
            losses[i:i + len(hc)] = loss
            if grad_h is not None:  # softmax (in the logits' memory), minus the targets
                dlogits = logits.sub_(lse[:, None]).exp_()
                dlogits[r, yc] -= keep
                if soft is not None:
                    dlogits.scatter_add_(1, ids, -probs)
                if softcap:
                    dlogits *= 1 - t * t
                grad_h[i:i + len(hc)] = (dlogits.to(weight.dtype) @ weight).float()
        ctx.save_for_backward(grad_h if grad_h is not None else h.new_empty(0))
        ctx.h_dtype = h.dtype
        ctx.mark_non_differentiable(gold)
        return losses, gold

    @staticmethod
    def backward(ctx, grad_losses: Tensor, _grad_gold: Tensor):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_losses[:, None]).to(ctx.h_dtype), None, None, None, None
