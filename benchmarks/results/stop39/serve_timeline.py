"""A timeline of concurrent rounds through a real server (stop 39's batching probe).

    python benchmarks/results/stop39/serve_timeline.py

The store and server of ``serve_bench`` (16 facts, k=2, the default model); three rounds of
16 concurrent clients, each followed by the same 16 one at a time. Per round: when the
clients sent and were answered, and each batch the batcher retrieved for and decoded (its
size and span), relative to the round's start; so a burst decoded as more than one batch
shows.
"""

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import serve_bench  # noqa: E402
from bench_models import load_models  # noqa: E402
from store_bench import synthetic_atoms  # noqa: E402

from compiler.pipeline import store_header  # noqa: E402
from composer import Composer  # noqa: E402
from composer.batcher import Batcher  # noqa: E402
from microlora.core.config import AskConfig, TargetSpec  # noqa: E402
from microlora.core.targets import select_targets  # noqa: E402
from microlora.server.app import Service, serve_in_thread  # noqa: E402
from microlora.server.config import ServeConfig  # noqa: E402
from microlora.server.keys import KeyStore  # noqa: E402
from store import AdapterStore  # noqa: E402


def main() -> None:
    args = argparse.Namespace(base_model=None, embedder=None, device=None, base_dtype="auto")
    base, emb = load_models(args)
    shapes = {name: (m.in_features, m.out_features)
              for name, m in select_targets(base.model, TargetSpec()).items()}
    pairs = serve_bench.facts()
    work = Path(tempfile.mkdtemp())
    records = [r for batch in synthetic_atoms(len(pairs), shapes, seed=0, batch=64, std=0.02,
                                              dim=emb.dim) for r in batch]
    for r, (text, _), v in zip(records, pairs, emb.encode([t for t, _ in pairs])):
        r.text, r.embedding, r.base_fingerprint = text, v, base.fingerprint
    with AdapterStore.create(work / "store", store_header(base, emb)) as s:
        s.put("corpus", records)
    key, _ = KeyStore(work / "store").add("bench")
    questions = [q for _, q in pairs if q][:serve_bench.CLIENTS]
    composer = Composer(AdapterStore(work / "store"), base, emb)
    service = Service(composer, ServeConfig(max_batch=16, ask=AskConfig(k=2)))
    events: list[tuple[str, float, float]] = []

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            label = name if name == "retrieve" else f"decode {len(a[0])}"
            events.append((label, t, time.perf_counter()))
            return out
        return wrapper

    composer.ask_batch = timed("decode", composer.ask_batch)
    Batcher._retrieve = timed("retrieve", Batcher._retrieve)
    try:
        with serve_in_thread(service) as url, httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600,
                limits=httpx.Limits(max_connections=16)) as client:
            def ask(question: str) -> tuple[float, float]:
                t = time.perf_counter()
                client.post("/v1/chat/completions", json={
                    "model": "microlora", "max_tokens": 16,
                    "messages": [{"role": "user", "content": question}]}).raise_for_status()
                return t, time.perf_counter()

            ask(questions[0])
            for round_ in range(3):
                events.clear()
                with ThreadPoolExecutor(16) as pool:
                    t0 = time.perf_counter()
                    spans = list(pool.map(ask, questions))
                    wall = time.perf_counter() - t0
                sent, done = [s - t0 for s, _ in spans], [e - t0 for _, e in spans]
                print(f"round {round_}: wall {wall:.3f} s, sent {min(sent):.3f}..{max(sent):.3f},"
                      f" answered {min(done):.3f}..{max(done):.3f}")
                for label, a, b in events:
                    print(f"   {label}: {a - t0:.3f}..{b - t0:.3f}")
                t0 = time.perf_counter()
                for q in questions:
                    ask(q)
                print(f"   the 16 one at a time: {time.perf_counter() - t0:.3f} s")
    finally:
        service.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
