"""QA datasets for the harness: passages to compile, questions about some of them, and
distractor passages that are compiled but never asked about.

- ``cpkc``: rows ``{"id", "question", "context", "answer", "original_answer"?, "kind"?}``,
  e.g. benchmarks/data/cpkc_dev.jsonl (counterfactual: the passage's answer is not the
  world's) or benchmarks/data/docs_dev.jsonl (invented multi-sentence documents; ``kind`` is
  ``pronoun``, ``bridge`` or ``direct``, reported separately). Rows with the same context
  are questions about one passage, compiled once.
- ``fictional``: benchmarks/data/fictional_knowledge.json, invented passages with completion
  probes of three kinds: ``mem`` (a sentence of the passage), ``gen`` (paraphrased) and
  ``hard_gen`` (the fact in a new context).

Passages are split once, by position, into a ``tune`` part (the last ones: choose defaults on
it) and an ``eval`` part (report on it), so numbers in the README come from questions no
setting was chosen on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from microlora.core.errors import MicroloraError

TUNE_ROWS = {"cpkc": 100, "fictional": 30}  # the last passages of a file: the tuning split,
# at most a third of them (a smaller file, such as docs_dev's 95 documents, tunes on 31)
SPLITS = ("eval", "tune", "all")
PROBE_KINDS = ("mem", "gen", "hard_gen")


@dataclass
class Item:
    id: str
    question: str
    answer: str
    passage_id: str
    kind: str = "qa"  # qa, or mem / gen / hard_gen for completion probes
    original_answer: str | None = None


@dataclass
class Dataset:
    name: str
    template: str  # composer prompt template: "qa" or "completion"
    passages: dict[str, str]  # every passage to compile: asked ones, then distractors
    items: list[Item] = field(default_factory=list)
    distractors: list[str] = field(default_factory=list)  # passage ids nobody asks about
    source: str = ""  # the file it came from ("docs_dev.jsonl"): name is its format


def load_dataset(path: str | Path, name: str = "cpkc", *, limit: int | None = None,
                 distractors: int = 0, seed: int = 0, split: str = "eval") -> Dataset:
    """``limit`` passages to ask about and ``distractors`` more, drawn (seeded) from one
    split; raises if the split is too small."""
    path = Path(path)
    if not path.is_file():
        raise MicroloraError(f"no dataset file at {path}")
    if split not in SPLITS:
        raise MicroloraError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        if name == "cpkc":
            groups = _cpkc_groups(path)
        elif name == "fictional":
            groups = _fictional_groups(path)
        else:
            raise MicroloraError(f"unknown dataset kind {name!r}: use cpkc or fictional")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise MicroloraError(f"{path} is not a {name} dataset ({e})") from e
    tune = min(TUNE_ROWS[name], len(groups) // 3)
    groups = {"tune": groups[-tune:], "eval": groups[:-tune], "all": groups}[split]
    random.Random(seed).shuffle(groups)
    limit = len(groups) - distractors if limit is None else limit
    if limit < 1 or limit + distractors > len(groups):
        raise MicroloraError(f"the {split} split of {path.name} has {len(groups)} passages: "
                             f"not enough for {limit} asked + {distractors} distractors")
    asked, extra = groups[:limit], groups[limit:limit + distractors]
    ds = Dataset(name, "qa" if name == "cpkc" else "completion", {}, source=path.name)
    for pid, passage, items in asked:
        ds.passages[pid] = passage
        ds.items += items
    for pid, passage, _ in extra:
        ds.passages[pid] = passage
        ds.distractors.append(pid)
    return ds


def _cpkc_groups(path: Path) -> list[tuple[str, str, list[Item]]]:
    """One group per distinct context, in order of first appearance, named by its first
    row's id."""
    groups: dict[str, tuple[str, str, list[Item]]] = {}
    for line in path.read_text(encoding="utf-8-sig").split("\n"):  # as compile reads JSONL
        if not line.strip():
            continue
        row = json.loads(line)
        pid, _, items = groups.setdefault(row["context"], (str(row["id"]), row["context"], []))
        items.append(Item(str(row["id"]), row["question"], row["answer"], pid,
                          kind=row.get("kind", "qa"),
                          original_answer=row.get("original_answer")))
    return list(groups.values())


def _fictional_groups(path: Path) -> list[tuple[str, str, list[Item]]]:
    out = []
    for i, row in enumerate(json.loads(path.read_text(encoding="utf-8"))):
        pid = f"fk{i}"
        items = [Item(f"{pid}-{kind}{j}", prompt, target, pid, kind)
                 for kind in PROBE_KINDS
                 for j, (prompt, target) in enumerate(zip(row[f"{kind}_input"],
                                                          row[f"{kind}_target"]))]
        out.append((pid, row["train_context"], items))
    return out
