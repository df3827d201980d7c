"""The batched atom trainer: many atoms per optimiser step, each with its own rank-r adapter.

One forward/backward trains a whole batch through ``microlora.lora``'s per-sample kernel
(sample b is atom b). What makes it fast and makes the adapters compose:

- late-stage reuse: blocks below the first adapted one are frozen and unadapted, so their
  output is computed once per batch and replayed at every step;
- vocabulary-chunked loss: the 262k-way output layer is applied to target positions only, a
  few hundred rows at a time, with the gradient formed in the same pass, so full-batch logits
  never exist and nothing is recomputed (``linear_cross_entropy``);
- composition in the loop: each atom is trained with other atoms' adapters (frozen) composed
  beside its own, the way it will be used at query time (DESIGN.md: adapters trained alone
  destroy each other when summed; trained this way, sums keep working);
- adaptive budget: an atom stops once every target token has probability > ``stop_prob``
  under its composed adapter (enough for greedy recall), or at ``max_steps``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from compiler.views import STYLES as VIEW_STYLES
from microlora.lora import Adapter, MultiLoraModel, stack_adapters
from microlora.targets import TargetSpec, find_blocks

# Recipe fields newer than the stores in use, with their defaults then.
_KEY_SINCE_V1 = {"qa_views": 0, "view_style": "sentence"}
_LOSS_CHUNK_ROWS = 256  # target positions per output-layer chunk: ~0.3 GB of fp32 logits


@dataclass(frozen=True)
class TrainConfig:
    """The compile recipe; every field is part of an atom's id, so changing one retrains.

    rank: adapter rank per atom, 1 or 2 (``--rank``).
    scale: s in W + s·BA (PEFT's alpha / r).
    targets: which linears get adapters (``--targets``, ``--last-layers``).
    lr, max_steps: Adam learning rate and the step budget per atom (``--lr``, ``--steps``).
    stop_prob: an atom stops when every target token has at least this probability.
    neighbours: other atoms' adapters composed beside each atom while it trains.
    batch_atoms: atoms trained together in one step (``--batch-size``).
    bf16: autocast matmuls to bf16 (AMX on CPU, tensor cores on GPU).
    title_context: prefix each atom with its document title (not trained on, only read).
    vocab_candidates: train against a candidate vocabulary, the union of the base model's
        top-N tokens at every target position plus the targets, instead of all 262k tokens
        (0 = the full softmax). Whether an atom has learned, and its recorded loss, are always
        decided with the full softmax.
    neighbours_learn: batch neighbours are not detached, so each adapter also learns not to
        disturb the atoms it is composed beside (a locality term at no extra compute).
    qa_views: also train each atom on up to this many questions about its sentence, answered
        by one of its names, numbers or dates (``compiler.views``): parametric answers gain
        on both splits, compiling costs ~2.6x.
    view_style: "sentence" asks each view with the whole sentence around the answer,
        "clause" with only the clause around it (``compiler.views``).
    """

    rank: int = 2
    scale: float = 1.0
    targets: TargetSpec = field(default_factory=TargetSpec)
    lr: float = 5e-3
    max_steps: int = 25
    stop_prob: float = 0.5
    neighbours: int = 3
    batch_atoms: int = 32
    seed: int = 0
    bf16: bool = True
    title_context: bool = False
    vocab_candidates: int = 256
    neighbours_learn: bool = False
    qa_views: int = 2  # measured: benchmarks/RESULTS.md, "question views"
    view_style: str = "sentence"

    def __post_init__(self) -> None:
        if self.rank not in (1, 2, 4, 8):
            raise ValueError(f"--rank must be 1, 2, 4 or 8 (micro-adapters), got {self.rank}")
        if self.max_steps < 1 or self.batch_atoms < 1 or self.neighbours < 0:
            raise ValueError("--steps and --batch-size must be >= 1 and neighbours >= 0")
        if self.view_style not in VIEW_STYLES:
            raise ValueError(f"--view-style must be one of {VIEW_STYLES}, got {self.view_style!r}")

    def key(self) -> str:
        """A stable text form of the recipe for atom ids (batch size and seed excluded:
        they change how fast atoms train, not what they are)."""
        d = asdict(self)
        d.pop("batch_atoms")
        for name, default in _KEY_SINCE_V1.items():  # fields added later: at their default
            if d[name] == default:  # they stay out of the key, so existing atom ids hold
                d.pop(name)
        return json.dumps(d, sort_keys=True)


@dataclass
class TrainedAtom:
    adapter: dict[str, tuple[Tensor, Tensor]]  # module -> (A (r, in), B (out, r)), fp32 CPU
    steps: int
    final_loss: float


class AtomTrainer:
    """Trains batches of atoms on one frozen base model (attached once, removed by close())."""

    def __init__(self, model: nn.Module, tokenizer, config: TrainConfig = TrainConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.lora = MultiLoraModel(model, config.targets)
        prefix, self.blocks = find_blocks(model)
        self.first_block = min(int(name[len(prefix) + 1:].split(".")[0])
                               for name in self.lora.layers)
        self.device = next(model.parameters()).device

    def close(self) -> None:
        self.lora.remove()

    def __enter__(self) -> AtomTrainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- data --------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], contexts: Sequence[str] | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        return encode_targets(self.tokenizer, texts, contexts, self.device)

    # -- training ----------------------------------------------------------------------------

    def train(self, texts: Sequence[str], keys: Sequence[str], *,
              contexts: Sequence[str] | None = None,
              frozen_neighbours: Sequence[Sequence[Adapter]] | None = None,
              views: Sequence[Sequence[tuple[str, str]]] | None = None) -> list[TrainedAtom]:
        """Train one adapter per text. ``keys`` (atom ids) seed each atom's initialisation, so
        an atom starts the same whatever batch it lands in. ``frozen_neighbours[b]`` are stored
        atoms composed beside atom b (retrieved by similarity: its query-time company).
        ``views[b]`` are more (context, target) sequences that atom b's adapter is trained on
        too (e.g. questions about it and their answers); the atom has learned once all of its
        sequences pass ``stop_prob``."""
        cfg = self.config
        n = len(texts)
        row_texts, row_contexts = list(texts), list(contexts or [""] * n)
        group = list(range(n))  # row -> atom
        for b, extra in enumerate(views or []):
            for context, target in extra:
                row_texts.append(target)
                row_contexts.append(context)
                group.append(b)
        group_of = torch.tensor(group)
        ids, mask, tgt = self.encode(row_texts, row_contexts)
        params = self._init_params(keys)
        frozen = self._frozen(frozen_neighbours)
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.Adam([p for pair in params.values() for p in pair], lr=cfg.lr)

        with torch.no_grad(), self._autocast():
            prefix = self._prefix_hidden(ids, mask)  # (B, T, d): block inputs, computed once
            with self._replay(prefix):
                vocab = self._candidate_vocab(ids, mask, tgt)
        done = torch.zeros(n, dtype=torch.bool)
        steps = torch.zeros(n, dtype=torch.long)
        final = torch.zeros(n)
        snapshot: dict[str, tuple[Tensor, Tensor]] = {k: (A.detach().clone(), B.detach().clone())
                                                      for k, (A, B) in params.items()}
        for step in range(cfg.max_steps + 1):
            active = (~done).nonzero().squeeze(1)
            if len(active) == 0:
                break
            nbrs = self._batch_neighbours(n, active, gen)
            adapters = self._compose(params, active, nbrs, frozen)
            rows = torch.isin(group_of, active).nonzero().squeeze(1)  # the active atoms' rows
            slot = torch.searchsorted(active, group_of[rows])  # row -> its atom in ``active``
            if len(rows) != len(active):
                adapters = {k: (A[slot], B[slot]) for k, (A, B) in adapters.items()}
            with self.lora.adapters(adapters, cfg.scale), self._replay(prefix[rows]), \
                    self._autocast():
                hidden = self.model.base_model(input_ids=ids[rows],
                                               attention_mask=mask[rows]).last_hidden_state
                loss_per_atom, scored, min_prob = self._loss(
                    hidden, ids[rows], tgt[rows], vocab, cfg.stop_prob,
                    last=step == cfg.max_steps, group=slot, groups=len(active))
            finished = (min_prob > cfg.stop_prob) | (step == cfg.max_steps)
            for j in finished.nonzero().squeeze(1).tolist():
                b = active[j].item()
                done[b], steps[b], final[b] = True, step, scored[j].item()
                for k, (A, B) in params.items():  # keep the adapter as it was when it passed
                    snapshot[k][0][b] = A[b].detach()
                    snapshot[k][1][b] = B[b].detach()
            training = ~finished
            if not training.any():
                continue
            opt.zero_grad(set_to_none=True)
            loss_per_atom[training].sum().backward()  # sum: each atom's gradient is its own
            opt.step()
            with torch.no_grad():  # Adam's momentum would still move finished atoms: pin them,
                for k, (A, B) in params.items():  # as they stay composed beside the others
                    A[done] = snapshot[k][0][done]
                    B[done] = snapshot[k][1][done]
        return [TrainedAtom({k: (A[b].float().cpu(), B[b].float().cpu())
                             for k, (A, B) in snapshot.items()}, int(steps[b]), float(final[b]))
                for b in range(n)]

    def _init_params(self, keys: Sequence[str]) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """PEFT's init per atom: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, seeded by the atom."""
        r = self.config.rank
        shapes = self.lora.shapes()
        As = {name: torch.empty(len(keys), r, d_in) for name, (d_in, _) in shapes.items()}
        for b, key in enumerate(keys):
            seed = int.from_bytes(hashlib.sha256(f"{self.config.seed}:{key}".encode()).digest()[:8],
                                  "little") >> 1
            g = torch.Generator().manual_seed(seed)
            for name, (d_in, _) in shapes.items():
                bound = 1 / math.sqrt(d_in)
                As[name][b] = torch.rand(r, d_in, generator=g) * 2 * bound - bound
        return {name: (nn.Parameter(As[name].to(self.device)),
                       nn.Parameter(torch.zeros(len(keys), d_out, r, device=self.device)))
                for name, (_, d_out) in shapes.items()}

    def _frozen(self, neighbours: Sequence[Sequence[Adapter]] | None):
        if not neighbours or not any(neighbours):
            return {}
        return stack_adapters(neighbours, device=self.device)  # (B, F*r, in), (B, out, F*r)

    def _batch_neighbours(self, n: int, active: Tensor, gen: torch.Generator) -> Tensor:
        """For each active atom, m other atoms of the batch: (len(active), m) indices."""
        m = min(self.config.neighbours, n - 1)
        if m <= 0:
            return torch.empty(len(active), 0, dtype=torch.long)
        rows = []
        for b in active.tolist():
            others = torch.randperm(n - 1, generator=gen)[:m]
            rows.append(others + (others >= b).long())  # skip b itself
        return torch.stack(rows)

    def _compose(self, params, active: Tensor, nbrs: Tensor, frozen) -> dict[str, tuple]:
        """Per active atom: its own trainable adapter, then batch neighbours (detached unless
        ``neighbours_learn``), then stored neighbours, concatenated along the rank."""
        out = {}
        for name, (A, B) in params.items():
            parts_a, parts_b = [A[active]], [B[active]]
            if nbrs.shape[1]:
                k = nbrs.shape[1]
                src_a, src_b = (A, B) if self.config.neighbours_learn else (A.detach(),
                                                                              B.detach())
                na = src_a[nbrs]  # (B, k, r, in)
                nb = src_b[nbrs]  # (B, k, out, r)
                parts_a.append(na.reshape(len(active), k * A.shape[1], A.shape[2]))
                parts_b.append(nb.permute(0, 2, 1, 3).reshape(len(active), B.shape[1], -1))
            if name in frozen:
                fa, fb = frozen[name]
                parts_a.append(fa[active])
                parts_b.append(fb[active])
            out[name] = (torch.cat(parts_a, 1), torch.cat(parts_b, 2))
        return out

    def _loss(self, hidden: Tensor, ids: Tensor, tgt: Tensor, vocab: Tensor | None,
              stop_prob: float, last: bool, group: Tensor | None = None,
              groups: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Per atom: the training loss (mean cross-entropy over its target tokens, with a
        gradient), the scored loss and the smallest target-token probability, all without
        materialising (B, T, vocab) logits.

        With a candidate ``vocab`` the training loss covers those tokens only. Atoms that look
        learned under it, and every atom on the ``last`` step, are re-scored with the full
        softmax (the candidate one flatters: its denominator is smaller), so whether an atom
        stops, and the loss recorded for it, always come from the full softmax.
        """
        pos = tgt[:, 1:].nonzero()  # (n, 2): rows b, positions t whose next token is a target
        h = hidden[pos[:, 0], pos[:, 1]]  # (n, d): the states that predict them
        labels = ids[pos[:, 0], pos[:, 1] + 1]
        atoms = pos[:, 0] if group is None else group.to(pos.device)[pos[:, 0]]
        n_atoms = len(ids) if groups is None else groups
        weight = self._output_weight()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if vocab is None:
            ce = linear_cross_entropy(h, weight, labels, softcap)
        else:
            ce = linear_cross_entropy(h, self._candidate_weight, torch.searchsorted(vocab, labels),
                                      softcap)
        loss = _per_atom(ce, atoms, n_atoms, "mean")
        scored = loss.detach().clone()
        min_prob = torch.exp(-_per_atom(ce.detach(), atoms, n_atoms, "amax"))
        if vocab is not None:
            rescore = torch.ones_like(min_prob, dtype=torch.bool) if last else min_prob > stop_prob
            if rescore.any():
                rows = rescore[atoms]
                with torch.no_grad():
                    full = linear_cross_entropy(h[rows].detach(), weight, labels[rows], softcap)
                scored = torch.where(rescore, _per_atom(full, atoms[rows], n_atoms, "mean"),
                                     scored)
                min_prob = torch.where(rescore, torch.exp(-_per_atom(full, atoms[rows],
                                                                      n_atoms, "amax")),
                                       min_prob)
        return loss, scored, min_prob.cpu()

    @torch.no_grad()
    def _candidate_vocab(self, ids: Tensor, mask: Tensor, tgt: Tensor) -> Tensor | None:
        """Sorted token ids: the base model's top ``vocab_candidates`` at each target position,
        plus every target. The adapters move probability onto the targets, which are in it,
        and the strongest competitors are there too; the other ~260k tokens carry little mass
        and cost most of the time."""
        n = self.config.vocab_candidates
        if n <= 0 or n * 4 >= self._output_weight().shape[0]:
            return None  # a small vocabulary: the full softmax costs little
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        pos = tgt[:, 1:].nonzero()
        h = hidden[pos[:, 0], pos[:, 1]]
        weight = self._output_weight()
        top = torch.cat([(h[i:i + _LOSS_CHUNK_ROWS].to(weight.dtype) @ weight.T).topk(n).indices
                         for i in range(0, len(h), _LOSS_CHUNK_ROWS)])
        vocab = torch.unique(torch.cat([top.reshape(-1), ids[pos[:, 0], pos[:, 1] + 1]]))
        self._candidate_weight = weight[vocab]  # (V_c, d), gathered once per batch
        return vocab

    def _output_weight(self) -> Tensor:
        """The output layer's weight (V, d), in bf16 when training in bf16 (converted once)."""
        weight = self.model.get_output_embeddings().weight
        if not self.config.bf16 or weight.dtype == torch.bfloat16:
            return weight
        if getattr(self, "_bf16_weight", None) is None:
            self._bf16_weight = weight.detach().to(torch.bfloat16)
        return self._bf16_weight

    def _prefix_hidden(self, ids: Tensor, mask: Tensor) -> Tensor:
        """The hidden states entering the first adapted block, from one no-grad forward that
        stops there."""
        captured = {}

        def grab(_module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _StopForward

        handle = self.blocks[self.first_block].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model.base_model(input_ids=ids, attention_mask=mask)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["h"].detach()

    @contextmanager
    def _replay(self, hidden: Tensor) -> Iterator[None]:
        """Skip the frozen blocks below the first adapted one: the first returns the cached
        states, the rest pass them through."""
        originals = [self.blocks[i] for i in range(self.first_block)]
        for i in range(self.first_block):
            self.blocks[i] = _Replay(hidden if i == 0 else None)
        try:
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)


def encode_targets(tokenizer, texts: Sequence[str], contexts: Sequence[str] | None,
                   device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """BOS + context + text per row, right-padded: input ids (B, T), attention mask (B, T) and
    target mask (B, T): which positions are predicted (each text's tokens, not its BOS or
    context, which is only read)."""
    rows, targets = [], []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
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


def _per_atom(values: Tensor, atoms: Tensor, n: int, how: str) -> Tensor:
    """Reduce per-row values to per-atom values (mean or max over each atom's rows)."""
    out = torch.zeros(n, device=values.device, dtype=values.dtype)
    if how == "mean":
        count = torch.zeros(n, device=values.device).index_add_(0, atoms, torch.ones_like(values))
        return out.index_add(0, atoms, values) / count.clamp(min=1)
    return out.scatter_reduce(0, atoms, values, "amax", include_self=False)


def linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor,
                         softcap: float | None = None) -> Tensor:
    """Per-row cross-entropy of ``h @ weight.T`` against ``labels``, computed in row chunks
    with the gradient w.r.t. ``h`` formed in the same pass (softmax minus one-hot, times the
    weight), so neither the (rows, vocab) logits nor a recomputation are ever kept: two
    vocabulary-sized matmuls per row instead of three. ``weight`` is frozen."""
    return _LinearCrossEntropy.apply(h, weight, labels, softcap)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, softcap: float | None):
        losses = torch.empty(len(h), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) \
            if h.requires_grad else None
        rows = torch.arange(len(h), device=h.device)
        for i in range(0, len(h), _LOSS_CHUNK_ROWS):
            hc, yc, r = h[i:i + _LOSS_CHUNK_ROWS], labels[i:i + _LOSS_CHUNK_ROWS], \
                rows[:min(_LOSS_CHUNK_ROWS, len(h) - i)]
            logits = (hc.to(weight.dtype) @ weight.T).float()  # (rows, vocab)
            if softcap:
                t = torch.tanh(logits / softcap)
                logits = t * softcap
            lse = torch.logsumexp(logits, dim=-1)
            losses[i:i + len(hc)] = lse - logits[r, yc]
            if grad_h is not None:
                dlogits = torch.exp(logits - lse[:, None])  # softmax, then minus one-hot
                dlogits[r, yc] -= 1
                if softcap:
                    dlogits *= 1 - t * t
                grad_h[i:i + len(hc)] = (dlogits.to(weight.dtype) @ weight).float()
        ctx.save_for_backward(grad_h if grad_h is not None else h.new_empty(0))
        ctx.h_dtype = h.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_losses[:, None]).to(ctx.h_dtype), None, None, None


class _StopForward(Exception):
    pass


class _Replay(nn.Module):
    """Stands in for a frozen block: returns cached states (or passes its input through)."""

    def __init__(self, hidden: Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states if self.hidden is None else self.hidden
