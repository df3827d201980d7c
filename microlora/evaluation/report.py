"""Writing an evaluation: the summary JSON, per-question JSONL, a markdown table and a PNG."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def write_report(summary: dict, rows: list[dict], out: Path) -> list[Path]:
    """RESULT.json plus RESULT.answers.jsonl, RESULT.md and (with matplotlib) RESULT.png
    beside it; returns the paths written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    answers = out.with_suffix(".answers.jsonl")
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = out.with_suffix(".md")
    table.write_text(markdown(summary))
    written = [out, answers, table]
    chart = out.with_suffix(".png")
    if bar_chart(summary, chart):
        written.append(chart)
    return written


def markdown(summary: dict) -> str:
    """The systems table (and the k sweep, if any) as markdown."""
    systems = summary["systems"]
    has_original = any("original_rate" in s for s in systems.values())
    kinds = sorted({k for s in systems.values() for k in s.get("by_kind", {})})
    head = ["system", "EM", "F1", "contains"] + (["original"] if has_original else []) \
        + [f"{k} EM" for k in kinds] + ["s/question"]
    lines = [f"{_title(summary)}: {summary['n']} questions, {summary['passages']} passages "
             f"({summary['distractors']} distractors), {summary['compile']['atoms']} atoms, "
             f"k={summary['k']}, recall@k {summary['recall_at_k']:.2f}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in systems.items():
        cells = [name, f"{s['em']:.3f}", f"{s['f1']:.3f}", f"{s['contains']:.3f}"]
        if has_original:
            cells.append(f"{s.get('original_rate', 0):.3f}")
        cells += [f"{s['by_kind'][k]['em']:.3f}" for k in kinds]
        cells.append(f"{s['latency_s']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    sweep = summary.get("sweep", {})
    if len(sweep) > 1:
        names = _swept(sweep)
        lines += ["", "| k | recall@k | " + " | ".join(f"{n} EM" for n in names) + " |",
                  "|" + "---|" * (len(names) + 2)]
        for k, row in sorted(sweep.items(), key=lambda kv: int(kv[0])):
            cells = [k, f"{row['recall_at_k']:.2f}"] + [
                f"{row[n]['em']:.3f}" if n in row else "" for n in names]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _swept(sweep: dict) -> list[str]:
    """The systems a k sweep measured, in the order they first appear."""
    return list(dict.fromkeys(n for row in sweep.values() for n in row if n != "recall_at_k"))


def bar_chart(summary: dict, path: Path) -> bool:
    """EM and F1 per system at the run's k, and, when k was swept, EM against k per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no chart (pip install 'microlora[eval]')")
        return False
    names = list(summary["systems"])
    sweep = summary.get("sweep", {})
    panels = 2 if len(sweep) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(1.4 * len(names) + 2 + 4 * (panels - 1), 3.2),
                             squeeze=False)
    ax = axes[0][0]
    width = 0.38
    for i, metric in enumerate(("em", "f1")):
        ax.bar([x + (i - 0.5) * width for x in range(len(names))],
               [summary["systems"][n][metric] for n in names], width, label=metric.upper())
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"{_title(summary)}, n={summary['n']}, k={summary['k']}")
    if panels == 2:
        ax = axes[0][1]
        ks = sorted(sweep, key=int)
        for name in _swept(sweep):
            points = [(int(k), sweep[k][name]["em"]) for k in ks if name in sweep[k]]
            ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xlabel("k (atoms retrieved)")
        ax.set_ylabel("EM")
        ax.set_ylim(0, 1)
        ax.set_xticks([int(k) for k in ks])
        ax.legend(fontsize=7)
        ax.set_title("EM against k")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _title(summary: dict) -> str:
    """The data file's name, or the dataset's format where an older summary has no file."""
    return summary.get("data") or summary["dataset"]
