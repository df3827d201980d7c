"""Compose benchmark: assembling k stored atoms into the base model, microlora vs PEFT, and the
cost of composed adapters while decoding, side by side in one run on the default model.

    python benchmarks/compose_bench.py [--quick] [--sections mixed64] --out results/compose.json

(``--device cuda``, ``--base-model DIR``, ``--embedder DIR``: ``bench_models``.)

- assembly: time to make k in {1, 4, 8, 16} stored atoms active. microlora: retrieve nothing,
  read the atoms zero-copy from the LMDB store, compose them (one copy) and set them on the
  per-sample layers (``Composer.compose`` + ``MultiLoraModel.adapters``). PEFT: the same atoms
  as PEFT adapter folders, ``load_adapter`` for each, ``add_weighted_adapter(
  combination_type="cat")`` and ``set_adapter`` (undone, untimed, between trials). Both are
  checked to give the same logits.
- decoding: one request, 64 new tokens (no stopping), k=8 atoms composed vs the base model
  alone. A request's time includes composing its adapters (and, merged, the merge and the
  restore), so the overheads are end to end.
- mixed batch: 8 requests with 8 different sets of 8 atoms decoded together vs 8 base-model
  requests batched.
- mixed batch of 64 (``mixed_batch64_vs_base``): 64 requests with 64 different sets of 8 atoms
  vs 64 base-model requests, both decoded as the composer serves them (the prompt-prefix
  cache on: the base batch reuses every block's prefix states, the mixed one only those
  below the first adapted block), 64 new tokens (16 with ``--quick``); and the same two
  batches without the prefix cache (``..._no_prefix_cache``); 3 trials. The mixed batches
  are parametric requests served as ``ask`` serves them by default: the atoms kept off the
  prompt's shared prefix (``AskConfig.atoms_on_prefix``), so the base model alone reads it
  in every block and both batches reuse all of its states; ``--adapt-prefix`` composes the
  atoms over it too (as hybrid requests are served), so the mixed batch reuses only the
  prefix states below the first adapted block.

Atoms are synthetic rank-2 bf16 adapters of the default targets with small weights (std
0.02), so the model still produces ordinary text; timings do not depend on what they encode.
Trials run interleaved (ABC CBA ...) and medians are reported.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_models import add_model_options, load_models, synchronize
from paired import mirrored_blocks, overhead
from store_bench import synthetic_atoms, torch_machine, write_peft_dir, write_results
from tqdm import tqdm

from compiler.pipeline import store_header
from composer import Composer, Hit
from composer.generation import encode_prompts, generate
from composer.prompts import build_prompt
from microlora.core.config import AskConfig, TargetSpec
from microlora.core.models import load_base_model
from microlora.core.targets import select_targets
from store import AdapterStore

KS = (1, 4, 8, 16)
NEW_TOKENS = 64
MERGED_GOAL = 0.02  # merged composition: at most 2 % slower than the base model
SECTIONS = ("assembly", "decoding", "mixed8", "mixed64")
BIG_BATCH = 64
QUESTION = "Which company made the first pocket watch that winds itself with body heat?"


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn`` takes, its queued device work included."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def peft_assembly(peft_model, folders: list[Path]) -> float:
    """PEFT's route to k composed adapters; returns seconds, leaves the model as it found it."""
    names = [f"atom{i}" for i in range(len(folders))]
    t0 = time.perf_counter()
    for name, folder in zip(names, folders):
        peft_model.load_adapter(str(folder), adapter_name=name)
    peft_model.add_weighted_adapter(names, [1.0] * len(names), adapter_name="combo",
                                    combination_type="cat")
    peft_model.set_adapter("combo")
    synchronize(next(peft_model.parameters()).device)
    seconds = time.perf_counter() - t0
    return seconds


def peft_reset(peft_model, k: int) -> None:
    peft_model.set_adapter("base")
    for name in [f"atom{i}" for i in range(k)] + ["combo"]:
        peft_model.delete_adapter(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer trials")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"which measurements, comma-separated, of {','.join(SECTIONS)}")
    ap.add_argument("--adapt-prefix", dest="adapt_prefix", action="store_true", default=None,
                    help="mixed batches: atoms composed over the prompt's shared prefix too "
                         "(AskConfig.adapt_prefix; parametric requests keep them off it)")
    ap.add_argument("--no-adapt-prefix", dest="adapt_prefix", action="store_false",
                    help=argparse.SUPPRESS)  # today's default, kept for older commands
    add_model_options(ap)
    args = ap.parse_args()
    trials = 4 if args.quick else 8  # decoding: mirrored blocks, each runs every variant twice
    assembly_trials = 5 if args.quick else 20
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        ap.error(f"--sections takes some of {','.join(SECTIONS)}")

    base, emb = load_models(args)
    shapes = {name: (m.in_features, m.out_features)
              for name, m in select_targets(base.model, TargetSpec()).items()}
    n_atoms = max(KS) + 8 * BIG_BATCH
    work = Path(tempfile.mkdtemp())
    try:
        records = [r for batch in synthetic_atoms(n_atoms, shapes, seed=0, batch=64, std=0.02,
                                                  dim=emb.dim) for r in batch]
        for r in records:
            r.base_fingerprint = base.fingerprint
        with AdapterStore.create(work / "store", store_header(base, emb)) as s:
            s.put("bench", records)
        (work / "peft").mkdir()
        for r in records[:max(KS)]:
            write_peft_dir(work / "peft", r)
        ids = [r.id for r in records]
        result = run(base, emb, work, ids, trials, assembly_trials,
                     peft_copy=lambda: load_base_model(args.base_model,
                                                       device=args.device).model,
                     sections=sections, big_tokens=16 if args.quick else NEW_TOKENS,
                     adapt_prefix=AskConfig(adapt_prefix=args.adapt_prefix).atoms_on_prefix)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(result, args.out, torch_machine(base.model))


def run(base, emb, work: Path, ids: list[str], trials: int, assembly_trials: int,
        peft_copy, sections=SECTIONS, big_tokens: int = NEW_TOKENS,
        adapt_prefix: bool = True) -> dict:
    """The measurements; ``peft_copy()`` loads a second copy of the base model for PEFT."""
    result: dict = {"new_tokens": NEW_TOKENS, "trials": trials,
                    "assembly_trials": assembly_trials, "adapt_prefix": adapt_prefix}
    tok = base.tokenizer
    one_ids, one_mask = encode_prompts(tok, [build_prompt(tok, QUESTION)], base.device)
    composer = Composer(AdapterStore(work / "store", readonly=True), base, emb)
    hits_of = {k: [Hit("bench", i, 1.0) for i in ids[:k]] for k in KS}
    if "assembly" in sections:
        result.update(assembly(composer, work, ids, hits_of, one_ids, assembly_trials,
                               peft_copy))
    if "decoding" in sections:
        result.update(decoding(composer, one_ids, one_mask, hits_of[8], trials))
    if "mixed8" in sections:
        result.update(mixed_batch(composer, ids, 8, trials, NEW_TOKENS))
    if "mixed64" in sections:
        # 4 long runs a trial: 3 trials at most
        result.update(mixed_batch(composer, ids, BIG_BATCH, min(trials, 3), big_tokens,
                                  prefix=True, adapt_prefix=adapt_prefix))
    composer.close()
    return result


def assembly(composer: Composer, work: Path, ids: list[str], hits_of: dict, one_ids,
             assembly_trials: int, peft_copy) -> dict:
    """Making k stored atoms active, microlora vs PEFT (and their logits compared)."""
    from peft import PeftModel

    base, result = composer.base, {}
    timed_here = functools.partial(timed, device=base.device)
    peft_base = peft_copy()  # a second copy: PEFT rewrites the modules it wraps
    peft_model = PeftModel.from_pretrained(peft_base, str(work / "peft" / ids[0]),
                                           adapter_name="base")
    peft_model.eval()
    for k in KS:
        folders = [work / "peft" / i for i in ids[:k]]

        def ours(k: int = k) -> None:
            with composer.lora.adapters(composer.compose([hits_of[k]])):
                pass

        ours()  # warm up (first use wraps the target layers)
        t_ours = [timed_here(ours) for _ in range(assembly_trials)]
        t_peft = []
        for _ in tqdm(range(max(3, assembly_trials // 4)), desc=f"PEFT assembly k={k}"):
            t_peft.append(peft_assembly(peft_model, folders))
            if k == 4 and len(t_peft) == 1:  # the two routes compose the same adapter
                with torch.no_grad():
                    base_logits = base.model(input_ids=one_ids).logits[0, -1]
                    with composer.lora.adapters(composer.compose([hits_of[k]])):
                        ours_logits = base.model(input_ids=one_ids).logits[0, -1]
                    peft_logits = peft_model(input_ids=one_ids).logits[0, -1]
                result["assembly_max_logit_diff_k4"] = float(
                    (ours_logits - peft_logits).abs().max())
                # how far the 4 atoms move the logits: the diff above is small against this
                result["assembly_max_logit_change_k4"] = float(
                    (ours_logits - base_logits).abs().max())
            peft_reset(peft_model, k)
        result[f"assembly_ms_k{k}"] = statistics.median(t_ours) * 1e3
        result[f"peft_assembly_ms_k{k}"] = statistics.median(t_peft) * 1e3
        result[f"assembly_speedup_vs_peft_k{k}"] = statistics.median(t_peft) / statistics.median(
            t_ours)
    del peft_model, peft_base
    return result


def decoding(composer: Composer, one_ids, one_mask, hits: list[Hit], trials: int) -> dict:
    """One request of NEW_TOKENS tokens: base model, stacked k=8, merged k=8."""
    base, tok, result = composer.base, composer.base.tokenizer, {}
    timed_here = functools.partial(timed, device=base.device)

    def decode(ids_, mask_):
        generate(base.model, tok, ids_, mask_, max_new_tokens=NEW_TOKENS,
                 min_new_tokens=NEW_TOKENS)

    def request_base():
        decode(one_ids, one_mask)

    def request_stacked():
        with composer.lora.adapters(composer.compose([hits])):
            decode(one_ids, one_mask)

    def request_merged():
        adapters = composer.compose([hits])
        with composer.lora.merged(adapters):
            decode(one_ids, one_mask)

    fns = {"base": request_base, "stacked": request_stacked, "merged": request_merged}
    request_base()  # warm up
    request_merged()
    bar = tqdm(total=trials, desc="decoding (mirrored blocks)")
    runs = mirrored_blocks({name: functools.partial(timed_here, fn) for name, fn in fns.items()},
                           trials, progress=lambda b: bar.update(1))
    bar.close()
    result["base_tokens_per_s"] = 2 * NEW_TOKENS / statistics.median(runs["base"])
    for name in ("stacked", "merged"):
        result[f"{name}_tokens_per_s"] = 2 * NEW_TOKENS / statistics.median(runs[name])
        o = overhead(runs, name, "base")
        result.update({f"{name}_overhead": o["median"], f"{name}_overhead_q25": o["q25"],
                       f"{name}_overhead_q75": o["q75"]})
    result["merged_overhead_verdict"] = (
        "within goal" if result["merged_overhead_q75"] <= MERGED_GOAL else
        "over goal" if result["merged_overhead_q25"] > MERGED_GOAL else
        "undecided: rerun with more trials")
    return result


def mixed_batch(composer: Composer, ids: list[str], n: int, trials: int, new_tokens: int,
                prefix: bool = False, adapt_prefix: bool = True) -> dict:
    """n requests with n different sets of 8 atoms decoded together vs n base requests
    batched, interleaved; with ``prefix``, both through the prompt-prefix cache (as the
    composer serves them; ``adapt_prefix``: as ``AskConfig.adapt_prefix``) and both without
    it."""
    base, tok = composer.base, composer.base.tokenizer
    questions = [f"{QUESTION} ({i})" for i in range(n)]
    b_ids, b_mask = encode_prompts(tok, [build_prompt(tok, q) for q in questions], base.device)
    sets = [[Hit("bench", i, 1.0) for i in ids[max(KS) + 8 * j:max(KS) + 8 * (j + 1)]]
            for j in range(n)]
    shared = composer.prefixes.for_prompts(tok, "qa", False, adapted=adapt_prefix)
    settings = [(shared, ""), (None, "_no_prefix_cache")] if prefix else [(None, "")]
    runs: dict[tuple[str, str], list[float]] = {}

    def decode(adapters, reuse):
        with composer.lora.adapters(adapters):
            generate(base.model, tok, b_ids, b_mask, max_new_tokens=new_tokens,
                     min_new_tokens=new_tokens, prefix=reuse,
                     on_rows=composer.lora.select_samples)

    order = [(kind, reuse, tag) for reuse, tag in settings for kind in ("base", "mixed")]
    for t in tqdm(range(trials), desc=f"mixed batch of {n}"):
        for kind, reuse, tag in (order if t % 2 == 0 else order[::-1]):
            adapters = composer.compose(sets) if kind == "mixed" else {}
            runs.setdefault((kind, tag), []).append(
                timed(functools.partial(decode, adapters, reuse), base.device))
    name = "batch8" if n == 8 else f"batch{n}"
    ratio = "mixed_batch_vs_base" if n == 8 else f"mixed_batch{n}_vs_base"
    result: dict = {f"{name}_new_tokens": new_tokens} if n != 8 else {}
    for _, tag in settings:
        t_base, t_mixed = (statistics.median(runs[(k, tag)]) for k in ("base", "mixed"))
        result[f"{name}_base_tokens_per_s{tag}"] = n * new_tokens / t_base
        result[f"{name}_mixed_tokens_per_s{tag}"] = n * new_tokens / t_mixed
        result[f"{ratio}{tag}"] = t_base / t_mixed
    return result


if __name__ == "__main__":
    main()
