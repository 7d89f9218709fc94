#!/usr/bin/env bash
# The issue's quality bar: for each seed, generate the `small` world, build on this machine's CPUs,
# evaluate through Milvus (embedded stack unless LANDMARKS_MILVUS_URI is set). One JSON line per step.
# Usage: bench/quality.sh OUT_DIR SEED [SEED...]
set -euo pipefail
out=$1; shift
bin=${LANDMARKS_BIN:-.venv/bin/landmarks}
mkdir -p "$out"
for seed in "$@"; do
  "$bin" world --out "$out/world-$seed" --seed "$seed" --preset small --json | tail -n 1
  /usr/bin/time -f '{"build_wall_s": %e}' "$bin" build --world "$out/world-$seed" --out "$out/model-$seed.pt" \
    --preset small --version "small_seed_$seed" --json | tail -n 1
  "$bin" eval --world "$out/world-$seed" --model "$out/model-$seed.pt" --report "$out/report-$seed.html" --json | tail -n 1
done
