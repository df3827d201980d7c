"""Late-stage reuse: the blocks below the first adapted one are frozen and carry no adapter,
so their output for a batch is the same at every training step. ``FrozenPrefix`` computes it
once (a forward that stops at the first adapted block) and replays it at every step (the
frozen blocks are swapped for stand-ins that return the cached states)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from microlora.core.targets import find_blocks


class FrozenPrefix:
    """The frozen blocks of ``model`` below block ``first_adapted``."""

    def __init__(self, model: nn.Module, first_adapted: int):
        self.model, self.first = model, first_adapted
        _, self.blocks = find_blocks(model)

    def capture(self, ids: Tensor, mask: Tensor) -> Tensor:
        """The hidden states entering the first adapted block (B, T, d), from one forward
        that stops there. Call under ``torch.no_grad()``."""
        captured = {}

        def grab(_module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _StopForward

        handle = self.blocks[self.first].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model.base_model(input_ids=ids, attention_mask=mask)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["h"].detach()

    @contextmanager
    def replay(self, hidden: Tensor) -> Iterator[None]:
        """Skip the frozen blocks: the first returns ``hidden`` (the captured states of the
        rows in the batch), the rest pass it through."""
        originals = [self.blocks[i] for i in range(self.first)]
        for i in range(self.first):
            self.blocks[i] = _Replay(hidden if i == 0 else None)
        try:
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block


class _StopForward(Exception):
    pass


class _Replay(nn.Module):
    """Stands in for a frozen block: returns cached states (or passes its input through)."""

    def __init__(self, hidden: Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states if self.hidden is None else self.hidden
