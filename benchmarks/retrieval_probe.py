"""Which atom a question retrieves, under each way of embedding an atom: no training, the
embedder only, so a retrieval idea is measured in a minute before a compile is spent on it.

    python benchmarks/retrieval_probe.py --data benchmarks/data/docs_dev.jsonl --split tune \
        --limit 31 [--out results/probe.json]

An atom is counted right for a question when it belongs to the question's passage and its
sentence holds the answer (so a pronoun question is right only on the sentence with the
fact, not on the one that names the subject). Schemes: the sentence; ``--resolve-pronouns``'
sentence; the sentence with its paragraph's subject (``--subject-context``); its window; and
the sentence's and subject's vectors averaged.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import defaultdict

import numpy as np

from compiler.chunking import chunk_document
from compiler.decontext import about, resolve_pronoun
from compiler.documents import Document
from microlora.core.embedder import load_embedder
from microlora.core.models import ensure_default_model, load_default_tokenizer
from microlora.core.windows import count_tokens, window
from microlora.evaluation.datasets import load_dataset

SCHEMES = {
    "sentence": lambda atom, tokens: atom.text,
    "resolved_pronoun": lambda atom, tokens: resolve_pronoun(atom.context, atom.at),
    "with_subject": lambda atom, tokens: about(atom.context, atom.at),
    "window160": lambda atom, tokens: " ".join(window(atom.context, atom.at, 160, tokens)),
}


def probe(data: str, split: str, limit: int | None) -> dict[str, dict[str, float]]:
    """Per scheme: the share of questions (all, and per kind) whose top atom is right."""
    ds = load_dataset(data, split=split, limit=limit)
    tokenizer = load_default_tokenizer(ensure_default_model())
    tokens = functools.partial(count_tokens, tokenizer)
    embedder = load_embedder()
    atoms = [(pid, atom) for pid, text in ds.passages.items()
             for atom in chunk_document(Document(text=text, source=pid), tokenizer)]
    questions = embedder.encode([item.question for item in ds.items])
    vectors = {name: embedder.encode([scheme(atom, tokens) for _, atom in atoms])
               for name, scheme in SCHEMES.items()}
    vectors["sentence_and_subject"] = vectors["sentence"] + vectors["with_subject"]
    out = {}
    for name, v in vectors.items():
        top = (questions @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T).argmax(1)
        right = defaultdict(list)
        for item, t in zip(ds.items, top):
            pid, atom = atoms[t]
            hit = pid == item.passage_id and item.answer.lower() in atom.text.lower()
            right["all"].append(hit)
            right[item.kind].append(hit)
        out[name] = {kind: round(float(np.mean(hits)), 3) for kind, hits in right.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="benchmarks/data/docs_dev.jsonl")
    parser.add_argument("--split", default="tune")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = probe(args.data, args.split, args.limit)
    for name, shares in result.items():
        print(f"{name:22s} " + "  ".join(f"{k} {v:.3f}" for k, v in shares.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"data": args.data, "split": args.split, "answer_atom_at_1": result}, f,
                      indent=1)


if __name__ == "__main__":
    main()
