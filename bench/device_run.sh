#!/usr/bin/env bash
# On a lent GPU machine, which reaches no package index: install the wheels prepared here by
# `python -m shared.bench.device_wheels` into the machine's Python, check them, and run bench/gpu_bench.sh.
#
#     bash bench/device_run.sh STEP...       # steps, in the order given:
#       stack | decoder   install .device-wheels/STEP/*.whl (each part fits one call's 64 MiB: send it with
#                         the device tool's `carry`); the machine is thrown away after, so they go into its
#                         own environment, where the nvidia/ namespace the decoder shares with torch lives
#       check             torch's CUDA and the decoder wheels' versions, then the project's requirements
#                         against what the machine now has (image versions too)
#       gputests          the tests marked `gpu` (pytest -m gpu: the CUDA decoders, inference, search);
#                         decodertests: only the hardware decoder's. Output in $OUT/gputests.log. At most
#                         90 s a test and TESTS_TIMEOUT_S (240) in all: one hung CUDA test must not spend the call
#       bench             bash bench/gpu_bench.sh "$OUT" with nothing to install (results: $OUT/gpu-bench.jsonl)
# A failing check or test does not stop the steps after it: the bench's figures are worth having anyway.
#
# BUDGET_S: the call's time limit, the timeout_s given to the device tool. The tool stops the call then, or
# sooner when less device time is left than asked for (so ask for at most the time `status` says is left),
# and a bench run it stops loses its figures: every step ends 45 s before (DEADLINE_S, 560 s without BUDGET_S).
#
# Two calls, the second at once: the machine goes back after 30 s idle, with what the first installed
# (BENCHMARKS.md, "GPU", which says how to set the limits from the device time left):
#     carry [".device-wheels/stack"]    BUDGET_S=300 bash bench/device_run.sh stack check gputests
#     carry [".device-wheels/decoder"]  BUDGET_S=T TESTS_TIMEOUT_S=90 bash bench/device_run.sh decoder check decodertests bench
set -euo pipefail
export CALL_STARTED=${CALL_STARTED:-$(date +%s)}  # the call's time limit counts from here

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench-out}

DEADLINE_S=${DEADLINE_S:-560}
if [[ -n "${BUDGET_S:-}" ]]; then
  [[ "$BUDGET_S" =~ ^[0-9]+$ ]] || { echo "BUDGET_S: the call's time limit in whole seconds, not '$BUDGET_S'" >&2; exit 2; }
  # 45 s: a run stopped at the deadline has 15 s to print its last lines before SIGKILL; the rest is margin.
  if (( BUDGET_S - 45 < DEADLINE_S )); then DEADLINE_S=$(( BUDGET_S - 45 )); fi
fi
export DEADLINE_S  # gpu_bench.sh cuts each run's limit to it

seconds_left() { echo $(( DEADLINE_S - ($(date +%s) - CALL_STARTED) )); }

mkdir -p "$OUT_DIR"

for step in "$@"; do
  case "$step" in
    stack|decoder)
      wheels=(.device-wheels/"$step"/*.whl)
      [[ -e "${wheels[0]}" ]] || { echo "no wheels in .device-wheels/$step: carry it" >&2; exit 2; }
      echo "== installing ${#wheels[@]} $step wheels" >&2
      if ! "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir "${wheels[@]}"; then
        [[ "$step" == decoder ]] || exit 1  # without the stack nothing runs
        echo "(the decoder's wheels did not install: the bench decodes with torchvision's nvJPEG)" >&2
      fi
      ;;
    check)
      "$PY" -m shared.bench.device_wheels --check || echo "(the bench still runs; see above)" >&2
      ;;
    gputests|decodertests)
      only=(); [[ "$step" == decodertests ]] && only=(-k nvimgcodec)
      left=$(seconds_left)
      if (( left < 10 )); then echo "($step not run: ${left}s left before DEADLINE_S)" >&2; continue; fi
      limit=$(( left < ${TESTS_TIMEOUT_S:-240} ? left : ${TESTS_TIMEOUT_S:-240} ))
      # pytest-timeout's 600 s a test (pyproject) would let one hung CUDA call spend the call.
      rc=0
      timeout -k 10 "$limit" "$PY" -m pytest -q -p no:cacheprovider -o timeout=90 --continue-on-collection-errors \
        -m gpu "${only[@]}" tests/unit 2>&1 | tee "$OUT_DIR/gputests.log" || rc=$?
      case $rc in
        0) ;;
        124|137) echo "(GPU tests stopped after ${limit}s; see gputests.log)" >&2 ;;
        *) echo "(GPU tests failed; see above)" >&2 ;;
      esac
      ;;
    bench)
      SKIP_INSTALL=1 PYTHON="$PY" bash bench/gpu_bench.sh "$OUT_DIR"
      ;;
    *)
      echo "unknown step: $step (stack, decoder, check, gputests, decodertests, bench)" >&2; exit 2
      ;;
  esac
done
