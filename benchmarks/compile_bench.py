"""Compile benchmark: microlora's batched trainer vs the PEFT loop a user would write, side by
side in one run on the same atoms, the default model and the default recipe.

    python benchmarks/compile_bench.py [--quick] --out results/compile.json

(a) naive: one ``get_peft_model`` LoRA per atom (same rank, targets, learning rate and step
budget), fp32, batch 1, the stock HF loss, trained one atom after another;
(b) microlora: ``compiler.trainer.AtomTrainer`` with the default ``TrainConfig`` (batches of
atoms, bf16 autocast, replayed frozen prefix, chunked loss, composition in the loop, adaptive
stop).
Both are then scored the same way, fp32 with the full-vocabulary cross-entropy over each
atom's tokens: ``mean_final_loss`` with the atom's adapter composed beside the adapters of
``neighbours`` other atoms (as at query time: adapters are always composed), and
``alone_mean_loss`` with its adapter alone. Atoms are sentences of the invented passages in
``benchmarks/data/fictional_knowledge.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from compiler.chunking import chunk_document
from compiler.documents import Document
from compiler.trainer import AtomTrainer
from microlora.core.config import TrainConfig
from microlora.core.kernel import MultiLoraModel
from microlora.core.models import load_base_model
from microlora.core.pack import Packed, compose
from microlora.core.targets import select_targets

DATA = Path(__file__).parent / "data" / "fictional_knowledge.json"


def load_atoms(tokenizer, n: int) -> list[str]:
    atoms: list[str] = []
    for i, item in enumerate(json.loads(DATA.read_text())):
        atoms += [a.text for a in chunk_document(Document(f"fk{i}", item["train_context"]),
                                                 tokenizer)]
        if len(atoms) >= n:
            return atoms[:n]
    return atoms


def encode(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids  # BOS + text, like the trainer


def train_naive(base, atoms: list[str], config: TrainConfig) -> tuple[list[Packed], float, int]:
    """The baseline a PEFT user would write: a fresh LoRA per atom, trained alone."""
    from peft import LoraConfig, get_peft_model

    names = list(select_targets(base.model, config.targets))
    adapters, steps = [], 0
    t0 = time.perf_counter()
    for text in tqdm(atoms, desc="naive PEFT", unit="atom"):
        peft_model = get_peft_model(base.model, LoraConfig(
            r=config.rank, lora_alpha=config.rank * config.scale, target_modules=names,
            lora_dropout=0.0))
        opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad],
                               lr=config.lr)
        ids = encode(base.tokenizer, text)
        for _ in range(config.max_steps):
            loss = peft_model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        modules = {n: peft_model.base_model.model.get_submodule(n) for n in names}
        adapters.append(Packed.of({n: (m.lora_A["default"].weight.detach(),  # scale into B
                                       m.lora_B["default"].weight.detach() * config.scale)
                                   for n, m in modules.items()}))
        peft_model.unload()  # back to the plain base model for the next atom
    return adapters, time.perf_counter() - t0, steps


def train_microlora(base, atoms: list[str], config: TrainConfig):
    t0 = time.perf_counter()
    out = []
    with AtomTrainer(base.model, base.tokenizer, config) as trainer:
        for i in tqdm(range(0, len(atoms), config.batch_atoms), desc="microlora", unit="batch"):
            batch = atoms[i:i + config.batch_atoms]
            out += trainer.train(batch, [f"bench-{i + j}" for j in range(len(batch))])
    seconds = time.perf_counter() - t0
    return [t.adapter for t in out], seconds, sum(t.steps for t in out)


@torch.no_grad()
def final_losses(base, atoms: list[str], adapters: list[Packed], config: TrainConfig,
                 company: int) -> list[float]:
    """Each atom's loss (fp32, full softmax, mean CE over its tokens) under its own adapter
    composed with the adapters of the ``company`` atoms after it (cyclically): the way atoms
    are used at query time. ``company=0`` scores each adapter alone."""
    lora = MultiLoraModel(base.model, config.targets)
    try:
        losses = []
        for i, text in enumerate(atoms):
            group = [adapters[(i + j) % len(atoms)] for j in range(company + 1)]
            ids = encode(base.tokenizer, text)
            with lora.adapters(compose([group])):
                losses.append(base.model(input_ids=ids, labels=ids).loss.item())
        return losses
    finally:
        lora.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 atoms instead of 64")
    ap.add_argument("--atoms", type=int, help="override the number of atoms")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    args = ap.parse_args()
    n = args.atoms or (16 if args.quick else 64)

    base = load_base_model(device="cpu")
    config = TrainConfig()
    atoms = load_atoms(base.tokenizer, n)
    torch.manual_seed(0)
    ours, t_ours, steps_ours = train_microlora(base, atoms, config)
    torch.manual_seed(0)
    naive, t_naive, steps_naive = train_naive(base, atoms, config)
    company = config.neighbours
    loss_ours = final_losses(base, atoms, ours, config, company)
    loss_naive = final_losses(base, atoms, naive, config, company)
    alone_ours = final_losses(base, atoms, ours, config, 0)
    alone_naive = final_losses(base, atoms, naive, config, 0)

    result = {
        "atoms": len(atoms),
        "tokens_per_atom": sum(encode(base.tokenizer, a).shape[1] for a in atoms) / len(atoms),
        "atoms_per_s": len(atoms) / t_ours,
        "naive_atoms_per_s": len(atoms) / t_naive,
        "speedup": t_naive / t_ours,
        "mean_final_loss": sum(loss_ours) / len(atoms),
        "naive_mean_final_loss": sum(loss_naive) / len(atoms),
        "atom_steps_per_s": steps_ours / t_ours,
        "naive_atom_steps_per_s": steps_naive / t_naive,
        "mean_steps": steps_ours / len(atoms),
        "naive_mean_steps": steps_naive / len(atoms),
        "composed_with": company,
        "alone_mean_loss": sum(alone_ours) / len(atoms),
        "naive_alone_mean_loss": sum(alone_naive) / len(atoms),
        "config": {k: str(v) for k, v in vars(config).items()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        if key != "config":
            print(f"{key:>24}: {value:.3f}" if isinstance(value, float) else f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
