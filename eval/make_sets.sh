#!/usr/bin/env sh
# Writes the evaluation sets into eval/sets/ (idempotent: same bytes on every run).
#   dev-seed1/2/3  — for tuning
#   holdout-seed42 — never tune on it; look at it once, at the end
# Usage: eval/make_sets.sh [SCALE]   (default 1.0; each set is ~27k prompts, ~9 MB at scale 1)
set -eu
cd "$(dirname "$0")/.."
SCALE="${1:-1.0}"
PY="${PYTHON:-python3}"
mkdir -p eval/sets
for name in dev-seed1:1 dev-seed2:2 dev-seed3:3 holdout-seed42:42; do
    set_name="${name%%:*}"
    seed="${name##*:}"
    "$PY" eval/make_traffic.py --seed "$seed" --scale "$SCALE" --out "eval/sets/$set_name.jsonl"
done
