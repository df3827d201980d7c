"""benchmarks/gpu_check.sh, dry-run on the CPU with miniature models, so that the script a GPU
machine runs once in a while cannot fail there for a typo: every step passes and writes its
results."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("MICROLORA_TEST_DEVICE", None)
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--device", "cpu", "--models", "tiny",
         "--out", str(out), "--work", str(tmp_path / "work"), "--limit-scale", "20"],
        env=env, capture_output=True, text=True, timeout=1800)
    log = (out / "check.log").read_text() if (out / "check.log").exists() else ""
    assert run.returncode == 0, f"{log}\n{run.stderr[-4000:]}"
    assert [line.split(":")[0] for line in log.splitlines()] == [
        "models", "cuda-tests", "compile_bench", "compose_bench", "serve_bench"]
    assert " passed" in (out / "cuda_tests.log").read_text()
    assert "skipped" not in (out / "cuda_tests.log").read_text()  # they ran, on the CPU
    assert json.loads((out / "models.json").read_text())["tiny"] is True
    compiled = json.loads((out / "compile.json").read_text())
    assert compiled["atoms"] > 0 and compiled["atoms_per_s"] > 0
    composed = json.loads((out / "compose.json").read_text())
    assert composed["mixed_batch_vs_base"] > 0 and composed["mixed_batch64_vs_base"] > 0
    served = json.loads((out / "serve.json").read_text())
    assert served["answers_identical"] is True
