"""A composed adapter out to PEFT's format, for servers that load PEFT LoRAs (PEFT itself,
vLLM, LoRAX, TGI): the k atoms' deltas summed into one LoRA of rank sum(r_i)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from composer.composer import Composer
from composer.retrieval import Hit
from microlora.core.errors import MicroloraError
from store import AdapterStore
from store.peft import write_peft


def hits_for_atoms(store: AdapterStore, atom_ids: Sequence[str],
                   namespaces: Sequence[str] | None = None) -> list[Hit]:
    """The atoms named by id, each found in the first of ``namespaces`` (default: all) that
    holds it, at weight 1."""
    spaces = list(namespaces) if namespaces else store.namespaces()
    hits = []
    for atom_id in atom_ids:
        for ns in spaces:
            with store.read(ns) as reader:
                if atom_id in reader:
                    hits.append(Hit(ns, atom_id, 1.0))
                    break
        else:
            raise MicroloraError(f"no atom {atom_id!r} in namespaces {', '.join(spaces)}")
    return hits


def export_peft(composer: Composer, hits: Sequence[Hit], out_dir: str | Path) -> Path:
    """Write the composition of ``hits`` (weights included) as a PEFT LoRA folder; the base
    model with it loaded gives the same outputs as microlora composing the same atoms."""
    if not hits:
        raise MicroloraError("no atoms to export")
    batched = composer.compose([list(hits)], reader=False)
    adapter = {name: (A[0], B[0]) for name, (A, B) in batched.items()}
    transposed = {composer.lora.layers[name].transposed for name in adapter}
    return write_peft(out_dir, adapter, base_model=str(composer.base.path),
                      fan_in_fan_out=transposed == {True})
