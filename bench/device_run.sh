#!/usr/bin/env bash
# On a lent GPU machine, which reaches no package index: install the wheels prepared here by
# `python -m shared.bench.device_wheels` into the machine's Python, check them, and run bench/gpu_bench.sh.
#
#     bash bench/device_run.sh STEP...       # steps, in the order given:
#       stack | decoder   install .device-wheels/STEP/*.whl (each part fits one call's 64 MiB: send it with
#                         the device tool's `carry`); the machine is thrown away after, so they go into its
#                         own environment, where the nvidia/ namespace the decoder shares with torch lives
#       check             the project's requirements against what the machine now has (image versions too)
#       gputests          the tests marked `gpu` (pytest -m gpu: the CUDA decoders, inference, search);
#                         decodertests: only the hardware decoder's. Output in $OUT/gputests.log
#       bench             bash bench/gpu_bench.sh "$OUT" with nothing to install (results: $OUT/gpu-bench.jsonl)
# A failing check or test does not stop the steps after it: the bench's figures are worth having anyway.
#
# Two calls, the second at once: the machine goes back after 30 s idle, with what the first installed
# (BENCHMARKS.md, "GPU"):
#     carry [".device-wheels/stack"]    bash bench/device_run.sh stack check gputests
#     carry [".device-wheels/decoder"]  bash bench/device_run.sh decoder check decodertests bench
set -euo pipefail
export CALL_STARTED=${CALL_STARTED:-$(date +%s)}  # gpu_bench.sh's runs end before the call's 600 s are up

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench-out}
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
      "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu "${only[@]}" tests/unit \
        2>&1 | tee "$OUT_DIR/gputests.log" || echo "(GPU tests failed; see above)" >&2
      ;;
    bench)
      SKIP_INSTALL=1 PYTHON="$PY" bash bench/gpu_bench.sh "$OUT_DIR"
      ;;
    *)
      echo "unknown step: $step (stack, decoder, check, gputests, decodertests, bench)" >&2; exit 2
      ;;
  esac
done
