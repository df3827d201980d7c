"""Run ``microlora quickstart`` as a new user would and write what it prints into README.md.

    python scripts/readme_quickstart.py            # a fresh store; rewrite the README's sample
    python scripts/readme_quickstart.py --cold     # also a fresh cache: the model converts too
    python scripts/readme_quickstart.py --check    # exit 1 when the README and a run disagree
                                                   # (run in the sample's base dtype)

The README's sample (between the markers below) is this script's output, never typed by hand,
so it cannot go stale: tests/test_default_model.py runs the check. Times are measured here,
from the command's start to the table's first line (time to first answer), and are the only
part of the sample a check does not compare.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN = "<!-- quickstart sample: written by scripts/readme_quickstart.py from a fresh run -->"
END = "<!-- end of quickstart sample -->"
SHOWN_HOME = "~/.cache/microlora"  # the cache as the README names it, wherever the run's was
_SECONDS = re.compile(r"\b\d+(\.\d+)? s\b")
_DTYPE = re.compile(r"^   base model \S+ in (\w+)$", re.MULTILINE)


@dataclass(frozen=True)
class Run:
    """What a fresh ``microlora quickstart`` printed, and when."""

    stdout: str  # the cache directory shown as SHOWN_HOME
    first_answer_s: float  # from the start of the process to the table's first line
    conversion_s: float | None  # the one-time model conversion, when this run did it
    load: float | None = None  # the machine's 1-minute load average as the run started


def run_quickstart(home: Path, base_dtype: str | None = None) -> Run:
    """``microlora --home HOME quickstart --fresh [--base-dtype D]`` in a child process, its
    progress (stderr) passed through; conversion seconds from the converted model's marker
    when it converted."""
    marker = home / "models" / "gemma-3-270m" / "microlora-converted.json"
    converted_before = marker.exists()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "microlora", "--home", str(home), "quickstart", "--fresh",
         *(["--base-dtype", base_dtype] if base_dtype else [])],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, encoding="utf-8",
        env=os.environ | {"PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    lines, first_answer, header_seen = [], None, False
    for line in child.stdout:
        if header_seen and first_answer is None:
            first_answer = time.perf_counter() - t0
        header_seen = header_seen or line.startswith("question (kind)")
        lines.append(line)
    if child.wait() != 0 or first_answer is None:
        raise SystemExit(f"the quickstart failed (exit {child.returncode}):\n{''.join(lines)}")
    conversion = (None if converted_before
                  else json.loads(marker.read_text()).get("seconds"))
    return Run("".join(lines).replace(str(home), SHOWN_HOME), first_answer, conversion, load)


def sample(run: Run) -> str:
    """The README's block: the output as printed, then the measured times."""
    cores, torch_threads = os.cpu_count(), _torch_threads()
    where = f"{cores} CPU cores, torch on {torch_threads} threads"
    if run.load is not None:  # a busy machine's times are not a new user's: say so
        where += f", load average {run.load:.1f} as it started"
    if run.conversion_s is None:
        timing = (f"Time to first answer: {run.first_answer_s:.0f} s from the command's start "
                  f"to the table's first line, measured on a fresh store ({where}; the base "
                  "model already converted: that happens once, on the first run)")
    else:
        timing = (f"Time to first answer on a fresh machine: {run.first_answer_s:.0f} s from "
                  f"the command's start to the table's first line ({where}), "
                  f"{run.conversion_s:.0f} s of it the one-time conversion of the base model; "
                  "later runs skip it")
    return (f"{BEGIN}\n\n```\n{run.stdout.rstrip()}\n```\n\n{timing}, measured by "
            f"`scripts/readme_quickstart.py`.\n\n{END}")


def readme_sample(text: str) -> str:
    """The block between the markers, markers included."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    return text[start:end + len(END)]


def sample_dtype(readme: str | None = None) -> str | None:
    """The base dtype the README's sample was run in ("base model NAME in fp32"): a check runs
    the quickstart in it, as the default ("auto") differs between machines."""
    found = _DTYPE.search(readme_sample(README.read_text() if readme is None else readme))
    return found.group(1) if found else None


def comparable(block: str) -> list[str]:
    """A sample with its measured seconds and timing sentence left out: what must match."""
    block = block[:block.rfind("```")]  # the printed output only, not the times below it
    return _SECONDS.sub("N s", block).splitlines()


def disagreement(run: Run, readme: str | None = None) -> list[str]:
    """A unified diff of the README's sample against ``run`` (empty when they agree)."""
    old = readme_sample(README.read_text() if readme is None else readme)
    return list(difflib.unified_diff(comparable(old), comparable(sample(run)), "README.md",
                                     "fresh run", lineterm=""))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=Path(
        os.environ.get("MICROLORA_HOME") or Path.home() / ".cache" / "microlora"),
        help="the cache to run in [default: $MICROLORA_HOME or ~/.cache/microlora]")
    parser.add_argument("--cold", action="store_true",
                        help="run in an empty temporary cache: the model converts too")
    parser.add_argument("--check", action="store_true",
                        help="compare with the README instead of rewriting it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="microlora-cold-") as cold:
        run = run_quickstart(Path(cold) if args.cold else args.home.expanduser(),
                             sample_dtype() if args.check else None)
    if args.check:
        diff = disagreement(run)
        print("\n".join(diff) or "README.md matches a fresh run")
        raise SystemExit(1 if diff else 0)
    text = README.read_text()
    README.write_text(text.replace(readme_sample(text), sample(run)))
    print(sample(run))


if __name__ == "__main__":
    main()
