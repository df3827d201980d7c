"""Compile benchmark: what ``microlora compile`` does with the default recipe, against the PEFT
loop a user would write for the same training rows, side by side in one run; and a growth run.

    python benchmarks/compile_bench.py [--quick] --out results/compile.json
    python benchmarks/compile_bench.py --growth [--quick] --out results/compile_growth.json
    python benchmarks/compile_bench.py --profile [--quick] --out results/compile_profile.json

(``--device cuda``, ``--base-model DIR``, ``--embedder DIR``: ``bench_models``.)

(a) microlora: ``compiler.pipeline.compile_documents`` with the default ``TrainConfig`` into a
fresh store, timed whole (planning, question views, training, embedding, store writes);
(b) naive: one ``get_peft_model`` LoRA per atom (same rank, targets, lr and step budget), on
the base model as ``from_pretrained`` gives it to a PEFT user, every weight in the dtype the
blocks compute in (``--base-dtype``: an fp32 base's vocabulary is not held in bf16 here,
``as_a_peft_user_loads_it``), over the same rows (the atom's sentence and its question views,
loss on their target tokens only) with the same objective: each view's answer taught half as
its label and half as the base model answers it reading the atom's window
(``TrainConfig.distill``: the teacher's top ``distill_topk`` tokens, computed once per atom),
the loss from HF's full logits; one atom after another.
Both are scored the same way, on that model, in fp32 with the full-vocabulary cross-entropy
over each atom's target tokens (all its rows): ``mean_final_loss`` with the adapters of the
``neighbours`` atoms after it composed beside it (as at query time with k > 1),
``alone_mean_loss`` alone (k = 1). The floor: an atom's tokens times its mean steps times 4
FLOP per adapted-block weight (forward 2, backward 2: the frozen weights get no gradient),
plus one forward for the candidate vocabulary, at the matmul rate this device reaches in the
dtype the base computes in (``floor_*``, ``matmul_gflops``, ``compute_dtype``).

``--profile``: the same compile of ours alone under cProfile, its time split into phases
(``phases``: training forward and backward, loss, scoring, teacher, candidate vocabulary,
frozen-prefix capture, the rest), the table in benchmarks/RESULTS.md.

The growth run compiles four parts of a corpus (fictional_knowledge passages, then cpkc_dev
contexts) into one store, each in a fresh process, so later parts train beside stored
neighbours: atoms/s per part (``growth_ratio`` = last / first) and each process's peak
resident memory (``peak_rss_mb`` = the largest).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_models import add_model_options, load_models, synchronize
from store_bench import torch_machine, write_results
from tqdm import tqdm

from compiler.chunking import Atom, chunk_document
from compiler.documents import Document
from compiler.lessons import teacher_window
from compiler.loss import encode_targets
from compiler.pipeline import compile_documents
from compiler.views import question_views
from microlora.core.config import ChunkConfig, TrainConfig
from microlora.core.kernel import MultiLoraModel
from microlora.core.models import BaseModel
from microlora.core.pack import Packed, compose
from microlora.core.targets import find_blocks, select_targets
from store import AdapterStore

DATA = Path(__file__).parent / "data"
NAMESPACE = "bench"


def corpus(tokenizer, n_atoms: int, skip_atoms: int = 0) -> list[Document]:
    """Passages (fictional_knowledge, then cpkc_dev contexts) whose atoms number about
    ``n_atoms``, after the first ``skip_atoms`` atoms' worth."""
    texts = [row["train_context"] for row in json.loads(
        (DATA / "fictional_knowledge.json").read_text())]
    texts += [json.loads(line)["context"] for line in
              (DATA / "cpkc_dev.jsonl").read_text().splitlines() if line.strip()]
    docs, seen = [], 0
    for i, text in enumerate(texts):
        doc = Document(f"passage-{i}", text)
        n = len(chunk_document(doc, tokenizer))
        if seen >= skip_atoms:
            docs.append(doc)
        seen += n
        if seen >= skip_atoms + n_atoms:
            break
    return docs


def rows_of(text: str, config: TrainConfig) -> list[tuple[str, str]]:
    """(context, target) rows an atom trains on: its sentence, then its question views."""
    return [("", text)] + question_views(text, config.qa_views, config.view_style)


def labelled(tokenizer, rows: list[tuple[str, str]], device: torch.device
             ) -> tuple[torch.Tensor, ...]:
    """HF inputs for an atom's rows: ids, mask, and labels on the target tokens only."""
    ids, mask, tgt = encode_targets(tokenizer, [t for _, t in rows], [c for c, _ in rows],
                                    device)
    return ids, mask, torch.where(tgt, ids, -100)


def train_microlora(base, embedder, docs: list[Document], config: TrainConfig, store_dir: Path):
    t0 = time.perf_counter()
    report = compile_documents(docs, store_dir, base=base, embedder=embedder,
                               namespace=NAMESPACE, train_config=config)
    seconds = time.perf_counter() - t0
    with AdapterStore(store_dir, readonly=True) as store:
        records = {r.text: r for r in store.get(NAMESPACE, store.ids(NAMESPACE))}
    return records, seconds, report


@torch.no_grad()
def teacher_targets(base, rows: list[tuple[str, str]], window: str, config: TrainConfig
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """What a PEFT user distilling as ``TrainConfig.distill`` computes once per atom: for each
    target token of the atom's rows (in order), the base model's top ``distill_topk`` tokens
    reading ``window`` before the question, renormalised and scaled by ``distill`` (ids and
    mass, (n, K) each); the atom's own sentence (row 0) gets no teacher: zero mass."""
    views = rows[1:]
    read = [f"Context: {window}\n{context}" for context, _ in views]
    ids, mask, tgt = encode_targets(base.tokenizer, [t for _, t in views], read, base.device)
    logits = base.model(input_ids=ids, attention_mask=mask).logits[:, :-1][tgt[:, 1:]]
    top = torch.softmax(logits.float(), -1).topk(config.distill_topk)
    probs = top.values / top.values.sum(1, keepdim=True) * config.distill
    own = int(encode_targets(base.tokenizer, [rows[0][1]], None, base.device)[2].sum())
    zeros = torch.zeros(own, config.distill_topk, device=base.device)
    return (torch.cat([zeros.long(), top.indices]), torch.cat([zeros, probs]))


def distilled_loss(logits: torch.Tensor, labels: torch.Tensor, teacher) -> torch.Tensor:
    """The mean over target tokens of (1 - mass) x CE(label) + sum of mass x CE(teacher's
    token): the trainer's objective (``compiler.loss.linear_cross_entropy``), from full
    logits as a PEFT loop has them."""
    targets = labels[:, 1:] != -100
    logp = torch.log_softmax(logits[:, :-1][targets].float(), -1)
    ids, probs = teacher
    label_ce = -logp.gather(1, labels[:, 1:][targets][:, None]).squeeze(1)
    soft_ce = -(probs * logp.gather(1, ids)).sum(1)
    return ((1 - probs.sum(1)) * label_ce + soft_ce).mean()


def train_naive(base, atoms: list[Atom], config: TrainConfig
                ) -> tuple[list[Packed], float, int]:
    """The baseline a PEFT user would write: a fresh LoRA per atom, trained alone on the
    atom's rows with the trainer's objective, for the step budget."""
    from peft import LoraConfig, get_peft_model

    names = list(select_targets(base.model, config.targets))
    adapters, steps = [], 0
    t0 = time.perf_counter()
    for atom in tqdm(atoms, desc="naive PEFT", unit="atom"):
        rows = rows_of(atom.text, config)
        teacher = teacher_targets(base, rows, teacher_window(atom, config, base.tokenizer),
                                  config) if config.distill and len(rows) > 1 else None
        peft_model = get_peft_model(base.model, LoraConfig(
            r=config.rank, lora_alpha=config.rank * config.scale, target_modules=names,
            lora_dropout=0.0))
        opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad],
                               lr=config.lr)
        ids, mask, labels = labelled(base.tokenizer, rows, base.device)
        for _ in range(config.max_steps):
            out = peft_model(input_ids=ids, attention_mask=mask,
                             labels=None if teacher else labels)
            loss = distilled_loss(out.logits, labels, teacher) if teacher else out.loss
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


@torch.no_grad()
def final_losses(base, texts: list[str], adapters: list[Packed], config: TrainConfig,
                 company: int) -> list[float]:
    """Each atom's loss (fp32, full softmax, mean CE over the target tokens of all its rows)
    under its own adapter composed with the adapters of the ``company`` atoms after it
    (cyclically). ``company=0`` scores each adapter alone."""
    lora = MultiLoraModel(base.model, config.targets)
    try:
        losses = []
        for i, text in enumerate(texts):
            group = [adapters[(i + j) % len(texts)] for j in range(company + 1)]
            ids, mask, labels = labelled(base.tokenizer, rows_of(text, config), base.device)
            with lora.adapters(compose([group] * len(ids), device=base.device)):
                losses.append(base.model(input_ids=ids, attention_mask=mask,
                                         labels=labels).loss.item())
        return losses
    finally:
        lora.remove()


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """The device's matmul rate in ``dtype`` (GFLOP/s), for the compute floor."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    a @ a
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    synchronize(device)
    return 10 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9


def models_and_corpus(args) -> tuple:
    """The models and the side-by-side corpus (``--atoms``, or 16 with ``--quick``, else 64)."""
    base, embedder = load_models(args)
    return base, embedder, corpus(base.tokenizer, args.atoms or (16 if args.quick else 64))


def as_a_peft_user_loads_it(base: BaseModel) -> BaseModel:
    """The base in one dtype throughout, as ``from_pretrained`` gives it to the baseline's
    user. ``load_base_model`` holds an fp32 base's vocabulary in bf16
    (``hold_vocabulary_in_bf16``), whose output layer is slower on a CPU without fast bf16
    matmuls: the baseline would pay for our memory saving, and the speedup look larger."""
    if base.quantization or base.model.get_input_embeddings().weight.dtype == base.dtype:
        return base
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=base.dtype,
                                                 local_files_only=True)
    return dataclasses.replace(base, model=model.to(base.device).eval().requires_grad_(False))


def side_by_side(args) -> dict:
    base, embedder, docs = models_and_corpus(args)
    config = TrainConfig()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        records, t_ours, report = train_microlora(base, embedder, docs, config, Path(tmp) / "s")
    texts = list(records)
    ours = [records[t].adapter for t in texts]
    atoms = {a.text: a for doc in docs for a in chunk_document(doc, base.tokenizer)}
    base = as_a_peft_user_loads_it(base)  # the baseline trains, and both are scored, on it
    torch.manual_seed(0)
    naive, t_naive, steps_naive = train_naive(base, [atoms[t] for t in texts], config)
    company = config.neighbours
    loss = {name: final_losses(base, texts, adapters, config, company)
            for name, adapters in (("ours", ours), ("naive", naive))}
    alone = {name: final_losses(base, texts, adapters, config, 0)
             for name, adapters in (("ours", ours), ("naive", naive))}
    tokens = [int(labelled(base.tokenizer, rows_of(t, config), base.device)[1].sum())
              for t in texts]
    # a token through the adapted blocks costs ~4 FLOP per weight (forward 2, backward 2: the
    # input's gradient only), at every step, plus a forward for the candidate vocabulary
    first = min(int(name.split(".")[2]) for name in select_targets(base.model, config.targets))
    _, blocks = find_blocks(base.model)
    weights = sum(p.numel() for block in blocks[first:] for p in block.parameters())
    flops = sum(tokens) * (4 * report.atom_steps / len(texts) + 2) * weights
    dtype = base.dtype  # what the trainer computes in: bf16 on a bf16 base, else fp32
    rate = matmul_gflops(base.device, dtype, 8192 if base.device.type == "cuda" else 2048)
    n = len(texts)
    return {
        "atoms": n, "tokens_per_atom": sum(tokens) / n, "rows_per_atom": sum(
            len(rows_of(t, config)) for t in texts) / n,
        "atoms_per_s": n / t_ours, "naive_atoms_per_s": n / t_naive, "speedup": t_naive / t_ours,
        "mean_final_loss": sum(loss["ours"]) / n, "naive_mean_final_loss": sum(loss["naive"]) / n,
        "alone_mean_loss": sum(alone["ours"]) / n,
        "naive_alone_mean_loss": sum(alone["naive"]) / n,
        "alone_losses": [round(x, 4) for x in alone["ours"]],  # per atom: a mean hides outliers
        "final_losses": [round(x, 4) for x in loss["ours"]],
        "steps": [records[t].extra.get("steps") for t in texts],
        "mean_steps": report.atom_steps / n, "naive_mean_steps": steps_naive / n,
        "atom_steps_per_s": report.atom_steps / t_ours,
        "naive_atom_steps_per_s": steps_naive / t_naive, "composed_with": company,
        "matmul_gflops": rate, "compute_dtype": str(dtype), "adapted_block_weights": weights,
        "floor_atoms_per_s": rate * 1e9 / (flops / n),
        "config": {k: str(v) for k, v in vars(config).items()},
        "machine": torch_machine(base.model),
    }


def growth_part(args) -> None:
    """One part of the growth run, in its own process: compile, then report as JSON."""
    base, embedder = load_models(args)
    docs = corpus(base.tokenizer, args.part_atoms, skip_atoms=args.part * args.part_atoms)
    stamps = []
    t0 = time.perf_counter()
    report = compile_documents(docs, args.store, base=base, embedder=embedder,
                               namespace=NAMESPACE, chunk_config=ChunkConfig(),
                               progress=lambda done, total: stamps.append(
                                   (done, time.perf_counter() - t0)))
    seconds = time.perf_counter() - t0
    print(json.dumps({"part": args.part, "trained": report.trained, "seconds": seconds,
                      "atoms_per_s": report.trained / seconds,
                      "mean_steps": report.atom_steps / max(report.trained, 1),
                      "mean_final_loss": report.mean_final_loss, "batches": stamps,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def growth(args) -> dict:
    part_atoms = 64 if args.quick else 500
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in range(4):
            out = subprocess.run(
                [sys.executable, __file__, "--growth-part", str(part), "--part-atoms",
                 str(part_atoms), "--store", str(Path(tmp) / "s"), "--out", "-",
                 *(["--device", args.device] if args.device else []), *model_folders(args)],
                check=True, capture_output=True, text=True).stdout
            parts.append(json.loads(out.strip().splitlines()[-1]))
            print(f"part {part}: {parts[-1]['trained']} atoms, "
                  f"{parts[-1]['atoms_per_s']:.3f} atoms/s, {parts[-1]['peak_rss_mb']:.0f} MB",
                  file=sys.stderr)
    return {"part_atoms": part_atoms, "parts": parts,
            "atoms_per_s": [p["atoms_per_s"] for p in parts],
            "growth_ratio": parts[-1]["atoms_per_s"] / parts[0]["atoms_per_s"],
            "peak_rss_mb": max(p["peak_rss_mb"] for p in parts)}


def profiled(args) -> dict:
    """Ours alone on the side-by-side corpus, under cProfile: seconds per phase."""
    import cProfile
    import pstats

    base, embedder, docs = models_and_corpus(args)
    profile = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        profile.enable()
        _, seconds, report = train_microlora(base, embedder, docs, TrainConfig(), Path(tmp) / "s")
        profile.disable()
    return {"atoms": report.trained, "atom_steps": report.atom_steps, "seconds": seconds,
            "phases": phases(pstats.Stats(profile))}


def phases(stats) -> dict[str, float]:
    """A compile's profile as seconds per phase (cumulative times of the functions that
    bound each phase; the forward is what training steps spend outside the others)."""
    def cumulative(file_end: str, name: str) -> float:
        return sum(ct for (path, _, fn), (_, _, _, ct, _) in stats.stats.items()
                   if path.endswith(file_end) and fn == name)

    total = cumulative("compiler/pipeline.py", "compile_documents")
    learn, train = (cumulative("compiler/trainer.py", n) for n in ("_learn", "train"))
    backward = cumulative("~", "<method 'run_backward' of 'torch._C._EngineBase' objects>")
    loss = cumulative("compiler/loss.py", "token_losses")
    scoring = cumulative("compiler/loss.py", "atom_scores")
    fixed = {"teacher": cumulative("compiler/trainer.py", "_teacher"),
             "candidate_vocabulary": cumulative("compiler/trainer.py", "_candidate_vocab"),
             "frozen_prefix_capture": cumulative("compiler/replay.py", "capture")}
    return {"training_forward": learn - backward - loss - scoring, "backward": backward,
            "training_loss": loss, "full_softmax_scoring": scoring, **fixed,
            "adam_composing_bookkeeping": train - learn - sum(fixed.values()),
            "planning_embedding_store": total - train, "total": total}


def model_folders(args) -> list[str]:
    """The --base-model and --embedder options given, for a child process."""
    return [arg for flag, folder in (("--base-model", args.base_model),
                                     ("--embedder", args.embedder)) if folder
            for arg in (flag, str(folder))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 atoms (growth: 4 x 64)")
    ap.add_argument("--atoms", type=int, help="override the number of atoms")
    ap.add_argument("--growth", action="store_true", help="the growth run instead")
    ap.add_argument("--profile", action="store_true",
                    help="ours alone under cProfile: seconds per phase of a compile")
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--growth-part", dest="part", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--part-atoms", type=int, default=500, help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    add_model_options(ap)
    args = ap.parse_args()
    if args.part is not None:
        return growth_part(args)
    if args.profile:
        return write_results(profiled(args), Path(args.out), torch_machine())
    result = growth(args) if args.growth else side_by_side(args)
    write_results(result, Path(args.out), torch_machine() if args.growth
                  else result.pop("machine"))


if __name__ == "__main__":
    main()
