"""Base dtype benchmark (``--base-dtype``): the same base model held in fp32, bf16, int8 and
int4, side by side in one run: memory, decoding speed, compile speed, and how far each
strays from fp32.

    python benchmarks/dtype_bench.py [--quick] --out results/dtype.json
    python benchmarks/dtype_bench.py --dtypes fp32,int8 --base-model DIR --embedder DIR ...

(``--device``, ``--base-model DIR``, ``--embedder DIR``: ``bench_models``; int4 runs on the
CPU only and is left out elsewhere.)

- memory: each dtype loaded alone in a fresh Python process: the bytes of its weights
  (``BaseModel.weight_bytes``), its resident set after loading less the process's before,
  and the process's peak (an int8 or int4 base is quantized from an fp32 load, so its peak
  is an fp32 model's, briefly);
- decoding: one request, ``NEW_TOKENS`` greedy tokens with one synthetic atom composed
  (stacked, as ``ask`` does), and a batch of 8 such requests; trials interleaved across the
  dtypes (ABCD DCBA ...), medians;
- agreement with fp32: the relative error of the last-position logits of a prompt, and the
  share of the one request's greedy tokens equal to fp32's;
- compile: ``compile_documents`` with the default recipe on the same few atoms
  (``--atoms``), each dtype into a fresh store, once each (atoms/s, mean final loss).

Quality (exact match) is not here: run ``microlora eval ... --base-dtype D`` per dtype
(benchmarks/RESULTS.md, "quantized base", has the commands).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_models import synchronize
from compile_bench import corpus
from compose_bench import QUESTION
from store_bench import synthetic_atoms, torch_machine, write_results
from tqdm import tqdm

from compiler.pipeline import compile_documents, store_header
from composer import Composer, Hit
from composer.generation import encode_prompts, generate
from composer.prompts import build_prompt
from microlora.core.config import WEIGHT_DTYPES, TargetSpec, TrainConfig
from microlora.core.embedder import load_embedder
from microlora.core.models import load_base_model
from microlora.core.targets import select_targets
from store import AdapterStore

NEW_TOKENS = 32  # per request (--new-tokens)
_MEMORY_PROBE = """
import json, resource, sys
import transformers.models.auto.modeling_auto  # imported before the baseline: not the model
from microlora.core.models import load_base_model
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
base = load_base_model(sys.argv[1] or None, device=sys.argv[2] or None, dtype=sys.argv[3])
print(json.dumps({"weight_mb": base.weight_bytes / 2**20, "rss_mb": (rss() - before) / 2**20,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def memory(base_model: Path | None, device: str | None, dtype: str) -> dict:
    """Load ``dtype`` alone in a fresh process (so nothing else's pages count)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(base_model or ""),
                          device or "", dtype], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return {k: round(v, 1) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer trials and atoms")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--dtypes", default=",".join(WEIGHT_DTYPES),
                    help="comma-separated --base-dtype values to compare (fp32 first: the "
                         "reference)")
    ap.add_argument("--atoms", type=int, help="atoms to compile per dtype [quick 8, else 32; "
                    "0: no compile]")
    ap.add_argument("--base-model", type=Path, help="a local model folder (default: the "
                    "packaged Gemma 3 270M; benchmarks/bench_models.py writes random ones)")
    ap.add_argument("--embedder", type=Path, help="a sentence-transformers folder (default: "
                    "the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="where the models run")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                    help="greedy tokens per request")
    args = ap.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if set(dtypes) - set(WEIGHT_DTYPES) or not dtypes:
        ap.error(f"--dtypes: choose from {', '.join(WEIGHT_DTYPES)}")
    if args.device == "cuda" and "int4" in dtypes:
        dtypes.remove("int4")  # torch's int4 kernel here is the CPU's
    trials = 3 if args.quick else 7
    n_atoms = args.atoms if args.atoms is not None else (8 if args.quick else 32)

    result: dict = {"dtypes": dtypes, "new_tokens": args.new_tokens, "trials": trials}
    for d in dtypes:
        result[f"{d}_memory"] = memory(args.base_model, args.device, d)
        print(f"{d} memory: {result[f'{d}_memory']}", file=sys.stderr, flush=True)
    emb = load_embedder(args.embedder, device=args.device)
    bases = {d: load_base_model(args.base_model, device=args.device, dtype=d) for d in dtypes}
    work = Path(tempfile.mkdtemp())
    try:
        result.update(decoding(bases, emb, work, trials, args.new_tokens))
        if n_atoms:
            result.update(compiling(bases, emb, work, n_atoms))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = bases[dtypes[0]]
    write_results(result, args.out, torch_machine(first.model))


def decoding(bases: dict, emb, work: Path, trials: int, new_tokens: int) -> dict:
    """Tokens/s with one atom composed, alone and 8 at once, and agreement with the first
    dtype, every dtype answering from a store of the same synthetic atoms."""
    any_base = next(iter(bases.values()))
    shapes = {name: (m.in_features, m.out_features)
              for name, m in select_targets(any_base.model, TargetSpec()).items()}
    records = [r for batch in synthetic_atoms(8, shapes, seed=0, batch=8, std=0.02,
                                              dim=emb.dim) for r in batch]
    composers = {}
    for d, base in bases.items():
        for r in records:
            r.base_fingerprint = base.fingerprint
        with AdapterStore.create(work / f"decode-{d}", store_header(base, emb)) as s:
            s.put("bench", records)
        composers[d] = Composer(AdapterStore(work / f"decode-{d}", readonly=True), base, emb)
    tok = any_base.tokenizer
    prompts = [build_prompt(tok, f"{QUESTION} ({i})") for i in range(8)]
    one = [[Hit("bench", records[0].id, 1.0)]]
    eight = [[Hit("bench", r.id, 1.0)] for r in records]
    out: dict = {}
    tokens: dict[str, list[int]] = {}
    last: dict[str, torch.Tensor] = {}

    def request(d: str, n: int) -> None:
        base, composer = bases[d], composers[d]
        ids, mask = encode_prompts(tok, prompts[:n], base.device)
        with composer.lora.adapters(composer.compose(one if n == 1 else eight)):
            generate(base.model, tok, ids, mask, max_new_tokens=new_tokens,
                     min_new_tokens=new_tokens)

    for d, base in bases.items():  # warm up, and what each answers
        request(d, 1)
        ids, mask = encode_prompts(tok, prompts[:1], base.device)
        with torch.no_grad(), composers[d].lora.adapters(composers[d].compose(one)):
            last[d] = base.model(input_ids=ids, attention_mask=mask).logits[0, -1].float()
            full = base.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        tokens[d] = full[0, ids.shape[1]:].tolist()
    ref = next(iter(bases))
    for d in bases:
        out[f"{d}_logit_rel_error_vs_{ref}"] = float(
            (last[d] - last[ref]).norm() / last[ref].norm())
        out[f"{d}_tokens_agree_with_{ref}"] = sum(
            a == b for a, b in zip(tokens[d], tokens[ref])) / new_tokens
    times: dict[tuple[str, int], list[float]] = {(d, n): [] for d in bases for n in (1, 8)}
    for t in tqdm(range(trials), desc="decoding"):
        order = list(bases) if t % 2 == 0 else list(bases)[::-1]
        for d in order:
            for n in (1, 8):
                synchronize(bases[d].device)
                t0 = time.perf_counter()
                request(d, n)
                synchronize(bases[d].device)
                times[(d, n)].append(time.perf_counter() - t0)
    for (d, n), ts in times.items():
        key = "tokens_per_s" if n == 1 else "batch8_tokens_per_s"
        out[f"{d}_{key}"] = n * new_tokens / statistics.median(ts)
    for composer in composers.values():
        composer.close()
    return out


def compiling(bases: dict, emb, work: Path, n_atoms: int) -> dict:
    """Atoms/s of the default recipe on the same atoms, each dtype into a fresh store."""
    out: dict = {}
    any_base = next(iter(bases.values()))
    docs = corpus(any_base.tokenizer, n_atoms)
    for d, base in tqdm(bases.items(), desc="compiling", total=len(bases)):
        t0 = time.perf_counter()
        report = compile_documents(docs, work / f"compile-{d}", base=base, embedder=emb,
                                   namespace="bench", train_config=TrainConfig())
        out[f"{d}_compile_atoms"] = report.trained
        out[f"{d}_compile_atoms_per_s"] = report.trained / (time.perf_counter() - t0)
        out[f"{d}_compile_mean_final_loss"] = report.mean_final_loss
    return out


if __name__ == "__main__":
    main()
