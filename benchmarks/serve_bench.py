"""Serve benchmark: 16 concurrent clients with distinct atom sets vs the same requests served
one at a time, through a real `microlora serve` (uvicorn on 127.0.0.1, HTTP, default model).

    python benchmarks/serve_bench.py [--quick] [--prefix-cache both] --out results/serve.json

(``--device cuda``, ``--base-model DIR``, ``--embedder DIR``: ``bench_models``.)

The store holds synthetic atoms (rank-2 bf16 adapters of the default targets, std 0.02, so
the model still writes ordinary text) whose texts are distinct invented facts embedded by the
default embedder; each client asks about a different fact, so each request retrieves and
composes its own k=2 atoms. Rounds alternate sequential / concurrent (and back), and the
median wall time of each is compared: ``concurrent_speedup`` = sequential / concurrent.
Concurrent answers are checked to equal the sequential ones (batching changes no answer).
``--prefix-cache both`` measures it all with the prompt-prefix cache off, then on (the
default; ``composer.prefix``), in one run: the keys ending ``_no_prefix_cache`` are the first
half, and the answers of the two halves are checked to be the same.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from bench_models import add_model_options, load_models
from store_bench import synthetic_atoms, torch_machine, write_results

from compiler.pipeline import store_header
from composer import Composer
from microlora.core.config import AskConfig, TargetSpec
from microlora.core.targets import select_targets
from microlora.server.app import Service, serve_in_thread
from microlora.server.config import ServeConfig
from microlora.server.keys import KeyStore
from store import AdapterStore

CLIENTS = 16
PEOPLE = ["Ada Brenner", "Tomas Okafor", "Lena Virtanen", "Rafael Quint", "Mira Sato",
          "Jonas Adeyemi", "Clara Nyström", "Idris Kovac", "Sofia Lindqvist", "Omar Castell",
          "Greta Halloway", "Yuki Marlowe", "Pavel Ostrander", "Nadia Ferreira", "Elio Tamsin",
          "Hana Volkova"]
THINGS = ["the glass harbour", "the copper observatory", "the salt library", "the river clock",
          "the paper bridge", "the amber lighthouse", "the iron orchard", "the silver canal",
          "the tin cathedral", "the stone aviary", "the velvet theatre", "the coal garden",
          "the brass archive", "the quartz market", "the cedar station", "the jade fountain"]


def facts() -> list[tuple[str, str]]:
    """(atom text, question about it): 16 asked facts, each with a second atom beside it."""
    out = []
    for i, (person, thing) in enumerate(zip(PEOPLE, THINGS)):
        out.append((f"{thing.capitalize()} was designed by {person} in {1801 + 7 * i}.",
                    f"Who designed {thing}?"))
        out.append((f"{thing.capitalize()} stands in the town of Vell{chr(97 + i)}ra.", ""))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round each, shorter answers")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--prefix-cache", choices=["on", "off", "both"], default="on",
                    help="serve with the prompt-prefix cache on, off, or off then on")
    add_model_options(ap)
    args = ap.parse_args()
    rounds = 1 if args.quick else 3
    max_tokens = 16 if args.quick else 32

    base, emb = load_models(args)
    shapes = {name: (m.in_features, m.out_features)
              for name, m in select_targets(base.model, TargetSpec()).items()}
    pairs = facts()
    work = Path(tempfile.mkdtemp())
    try:
        records = [r for batch in synthetic_atoms(len(pairs), shapes, seed=0, batch=64,
                                                  std=0.02, dim=emb.dim) for r in batch]
        vectors = emb.encode([text for text, _ in pairs])
        for r, (text, _), v in zip(records, pairs, vectors):
            r.text, r.embedding, r.base_fingerprint = text, v, base.fingerprint
        with AdapterStore.create(work / "store", store_header(base, emb)) as s:
            s.put("corpus", records)
        key, _ = KeyStore(work / "store").add("bench")
        questions = [q for _, q in pairs if q][:CLIENTS]
        halves = {}
        for flag in {"on": [True], "off": [False], "both": [False, True]}[args.prefix_cache]:
            service = Service(Composer(AdapterStore(work / "store"), base, emb),
                              ServeConfig(max_batch=CLIENTS,
                                          ask=AskConfig(k=2, prefix_cache=flag)))
            try:
                with serve_in_thread(service) as url:
                    halves[flag] = run(url, key, questions, rounds, max_tokens)
            finally:
                service.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = halves.get(True, halves.get(False))
    result["prefix_cache"] = True in halves
    if len(halves) == 2:
        off = halves[False]
        result.update({f"{k}_no_prefix_cache": v for k, v in off.items()
                       if k not in ("answers", "batch_size_histogram")})
        result["prefix_cache_speedup_sequential"] = off["sequential_s"] / result["sequential_s"]
        result["prefix_cache_speedup_concurrent"] = off["concurrent_s"] / result["concurrent_s"]
        result["answers_identical_across_prefix_cache"] = off["answers"] == result["answers"]
    for half in halves.values():
        del half["answers"]
    write_results(result, args.out, torch_machine(base.model))


def run(url: str, key: str, questions: list[str], rounds: int, max_tokens: int) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=600,
                      limits=httpx.Limits(max_connections=CLIENTS)) as client:

        def ask(question: str) -> dict:
            r = client.post("/v1/chat/completions", json={
                "model": "microlora", "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": question}]})
            r.raise_for_status()
            return r.json()

        ask(questions[0])  # warm-up: first-use costs (wrappers, caches) are not serving
        sequential, concurrent = [], []
        seq_answers = con_answers = None
        for i in range(2 * rounds):
            t0 = time.perf_counter()
            if i % 4 in (0, 3):  # S C C S S C ...: neither side always goes first
                seq_answers = [ask(q) for q in questions]
                sequential.append(time.perf_counter() - t0)
            else:
                with ThreadPoolExecutor(CLIENTS) as pool:
                    con_answers = list(pool.map(ask, questions))
                concurrent.append(time.perf_counter() - t0)
        metrics = client.get("/metrics").text

    def texts(answers):
        return [a["choices"][0]["message"]["content"] for a in answers]

    def atoms(answers):
        return [tuple(x["id"] for x in a["choices"][0]["atoms"]) for a in answers]

    tokens = sum(a["usage"]["completion_tokens"] for a in seq_answers)
    t_seq, t_con = statistics.median(sequential), statistics.median(concurrent)
    return {
        "clients": len(questions), "max_tokens": max_tokens, "rounds": rounds,
        "distinct_atom_sets": len(set(atoms(seq_answers))),
        "sequential_s": t_seq, "concurrent_s": t_con,
        "sequential_req_per_s": len(questions) / t_seq,
        "concurrent_req_per_s": len(questions) / t_con,
        "sequential_tok_per_s": tokens / t_seq, "concurrent_tok_per_s": tokens / t_con,
        "concurrent_speedup": t_seq / t_con,
        "answers_identical": texts(seq_answers) == texts(con_answers)
        and atoms(seq_answers) == atoms(con_answers),
        "answers": texts(seq_answers),  # for the caller's comparison across settings
        "batch_size_histogram": _batch_histogram(metrics),
    }


def _batch_histogram(metrics: str) -> dict[str, float]:
    """The server's own record of how many requests each decoding batch held."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith("microlora_batch_size_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


if __name__ == "__main__":
    main()
