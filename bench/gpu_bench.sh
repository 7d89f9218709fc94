#!/usr/bin/env bash
# The GPU benchmark of BENCHMARKS.md on one CUDA machine with PyTorch preinstalled, in under 5 minutes:
#
#     bash bench/gpu_bench.sh [OUT_DIR]            # default OUT_DIR: ./bench-out
#
# - uses the machine's Python with torch + torchvision (CUDA builds); PYTHON=... picks another;
# - installs the fleet's other dependencies into .venv-gpu, which sees the system site-packages so that the
#   preinstalled torch is kept (WHEELHOUSE=/dir installs offline from wheels instead of the index);
# - tries nvImageCodec (the hardware JPEG decoder the anchors found fastest); without it the bench falls
#   back to torchvision's nvJPEG, then to the CPU pool, and says which one it used (`decoder`);
# - PostgreSQL and Redis: LANDMARKS_DATABASE_URL / LANDMARKS_BROKER_URL when set, else the embedded stack
#   under LANDMARKS_HOME (default ./.landmarks-gpu); Milvus is a private milvus-lite server per run;
# - runs `bench --device cuda` for 12mp and 2mp, then the centroid search scale; each JSON object is one
#   line of OUT_DIR/gpu-bench.jsonl, the progress and logs go to OUT_DIR/bench.log; with time left, the 2mp
#   end to end again with two worker processes (cuda-2mp-2workers).
#
# Knobs: IMAGES_12MP (2048), IMAGES_2MP (4096), BATCH (256), WORKERS (1: worker processes end to end on
#        the one GPU; 2 when one process's Python is the limit, see worker_cpu_ms_per_img.main),
#        COMPILE=1 (time torch.compile; the end-to-end worker compiles its model at start),
#        SCALE_MAX (1000000), RUN_TIMEOUT_S (180 per bench run; 480 with COMPILE=1, which takes longer
#        than 5 minutes in all), TIME_BUDGET_S (420: the 2-worker run starts only if it can end by then),
#        DEADLINE_S (560, 1800 with COMPILE=1: no run goes on past it; bench/device_run.sh sets it from
#        the device call's limit), MIN_RUN_S (120: an end-to-end run with less time left is not started;
#        the search scale needs 75 s), SKIP_INSTALL=1 (with no .venv-gpu:
#        run with PYTHON's own packages).
#
# On a machine that reaches no package index (the lent ones here), bench/device_run.sh installs wheels
# prepared beforehand and calls this script.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-bench-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
export LANDMARKS_HOME=${LANDMARKS_HOME:-$PWD/.landmarks-gpu}
# bench/device_run.sh passes when its device call started: the call's time limit counts from there.
started=${CALL_STARTED:-$(date +%s)}

"$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device: this script is for a GPU machine")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}", file=sys.stderr)
EOF

PIP_OPTS=()
if [[ -n "${WHEELHOUSE:-}" ]]; then PIP_OPTS=(--no-index --find-links "$WHEELHOUSE"); fi
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv --system-site-packages "$VENV"
  # Every dependency but torch/torchvision, so pip never replaces the machine's CUDA build.
  mapfile -t DEPS < <("$VENV/bin/python" - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if re.split(r"[<>=\[ ;]", d)[0] not in ("torch", "torchvision")))
EOF
)
  "$VENV/bin/python" -m pip install --quiet "${PIP_OPTS[@]}" "${DEPS[@]}" psutil
  "$VENV/bin/python" -m pip install --quiet "${PIP_OPTS[@]}" --no-deps -e .
  CUDA_MAJOR=$("$VENV/bin/python" -c "import torch; print((torch.version.cuda or '0').split('.')[0])")
  case "$CUDA_MAJOR" in
    13) mapfile -t NVIMG < <("$VENV/bin/python" -c 'import tomllib  # the `gpu` extra, its pins included
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]))') ;;
    12) NVIMG=(nvidia-nvimgcodec-cu12 nvidia-nvjpeg-cu12) ;;
    *) NVIMG=() ;;
  esac
  if ((${#NVIMG[@]})); then
    "$VENV/bin/python" -m pip install --quiet "${PIP_OPTS[@]}" "${NVIMG[@]}" \
      || echo "nvImageCodec not installed: the bench decodes with torchvision nvJPEG" >&2
  fi
fi
BIN="$VENV/bin/python"
# SKIP_INSTALL=1 without the venv: the machine's own Python has everything (bench/device_run.sh put it there).
[[ -x "$BIN" ]] || BIN=$PY
"$BIN" -c "import shared.bench.run, shared.bench.search_scale" # the bench imports with the machine's torch

bench() {  # bench NAME MIN_S ARGS...: one JSON line appended to gpu-bench.jsonl, or an error line
  local name=$1 min_s=$2; shift 2
  # Each run ends by DEADLINE (560 s from the start: a device call is stopped at 600 s, or sooner when less
  # device time is left, and what a run stopped with it had measured would be lost), and one that cannot
  # finish in what is left (MIN_S: an end-to-end run needs minutes, the search scale one) does not start,
  # leaving that time to the runs after it.
  local left=$(( DEADLINE - ($(date +%s) - started) ))
  if (( left < min_s )); then
    echo "{\"run\": \"$name\", \"error\": \"not started: ${left}s left before DEADLINE_S, it needs ${min_s}s\"}" | tee -a "$OUT/gpu-bench.jsonl"
    return
  fi
  local limit=$(( left < RUN_TIMEOUT ? left : RUN_TIMEOUT ))
  local json; json=$(mktemp)
  echo "== $name: bench $* (at most ${limit}s)" | tee -a "$OUT/bench.log" >&2
  # SIGTERM lets the bench stop its workers and print their last lines; SIGKILL 15 s later if it hangs.
  if timeout -k 15 "$limit" "$BIN" -m shared.bench_cli bench --json "$@" >"$json" 2>>"$OUT/bench.log"; then
    tail -n 1 "$json" | tee -a "$OUT/gpu-bench.jsonl"
  else
    echo "{\"run\": \"$name\", \"error\": \"exit $?; see $OUT/bench.log\"}" | tee -a "$OUT/gpu-bench.jsonl"
    tail -n 20 "$OUT/bench.log" >&2
  fi
  rm -f "$json"
}

: >"$OUT/gpu-bench.jsonl"
: >"$OUT/bench.log"
EXTRA=(--workers "${WORKERS:-1}")
RUN_TIMEOUT=${RUN_TIMEOUT_S:-180}
DEADLINE=${DEADLINE_S:-560}
MIN_RUN=${MIN_RUN_S:-120}  # the least an end-to-end run takes here (services, model, stages, the worker)
if [[ "${COMPILE:-0}" == 1 ]]; then  # the worker compiles at start too: minutes more per run
  EXTRA+=(--compile)
  RUN_TIMEOUT=${RUN_TIMEOUT_S:-480}
  DEADLINE=${DEADLINE_S:-1800}
fi
bench cuda-12mp "$MIN_RUN" --device cuda --size 12mp --images "${IMAGES_12MP:-2048}" --batch-size "${BATCH:-256}" "${EXTRA[@]}"
bench cuda-2mp "$MIN_RUN" --device cuda --size 2mp --images "${IMAGES_2MP:-4096}" --batch-size "${BATCH:-256}" "${EXTRA[@]}"
bench cuda-search-scale 75 --device cuda --search-scale --scale-max "${SCALE_MAX:-1000000}" --milvus-cap-s 45
# With time left (TIME_BUDGET_S, 420 by default: a device call has 600), the 2 MP end-to-end again with two
# worker processes on the GPU: the way past one process's Python if worker_cpu_ms_per_img.main shows it.
# It starts only if a whole run fits before DEADLINE too: a run cut short there measures nothing.
END_BY=${TIME_BUDGET_S:-420}
(( DEADLINE > END_BY )) || END_BY=$DEADLINE
if (( $(date +%s) - started < END_BY - RUN_TIMEOUT )) && [[ "${WORKERS:-1}" == 1 ]]; then
  bench cuda-2mp-2workers "$MIN_RUN" --device cuda --size 2mp --images "${IMAGES_2MP:-4096}" --batch-size "${BATCH:-256}" \
    --workers 2 --skip-delf
fi
echo "done in $(( $(date +%s) - started ))s; results in $OUT/gpu-bench.jsonl" >&2
