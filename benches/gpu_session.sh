#!/usr/bin/env bash
# Runs the issue-4 measurements on a lent GPU machine (no Rust there): everything the session needs
# travels as git-ignored paths named in the device tool's `carry`:
#   dist/prompt-radar-cuda-sm90.xz   (`make cuda`, ~4 MB)
#   dist/it-cuda-sm90.xz             (`make cuda-test`, the integration tests with the GPU test;
#                                     only the `test` step needs it)
#   dist/model-f16/                  (`python3 models/half.py models/all-MiniLM-L6-v2 dist/model-f16`,
#                                     45 MB: the 90.9 MB f32 weights exceed the 64 MiB carry)
# Prompts are sampled there from eval/data (tracked, so they travel with the tree).
#
# usage: benches/gpu_session.sh STEP...     steps: verify test e2e model reindex (or all)
# Writes its tables and JSON under $OUT (the device tool brings that folder back). Stops at a
# failed check (verify, test), so a wrong GPU result costs no more device time; a failed
# measurement is reported and the next step still runs. SESSION_S (seconds, if
# set) is the whole command's budget: `reindex` is cut off 20 s before it ends, so that the log of
# the steps before it still comes back.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
T0=$(date +%s)
BIN=/tmp/prompt-radar-cuda
MODEL=${MODEL:-dist/model-f16}
[ -x "$BIN" ] || xz -dc dist/prompt-radar-cuda-sm90.xz > "$BIN" && chmod +x "$BIN"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
prompts() { # N FILE [--traffic]
  [ -f "$2" ] || python3 benches/sample_prompts.py --n "$1" ${3:-} --out "$2"
}
steps=("$@"); [ "${steps[*]:-all}" = all ] && steps=(verify test e2e model reindex)
# The 1M prompts of `reindex` are sampled in the background while the first steps check results.
SAMPLER=
case " ${steps[*]} " in *" reindex "*)
  if [ ! -f /tmp/p1m.jsonl ]; then
    (python3 benches/sample_prompts.py --n 1000000 --traffic --out /tmp/p1m.part >"$OUT/sample.txt" 2>&1 \
      && mv /tmp/p1m.part /tmp/p1m.jsonl) &
    SAMPLER=$!
  fi ;;
esac
run_step() {
  case $1 in
    verify) # cosine vs CPU f32 on 2,000 real prompts; the command fails below 0.999
      prompts 20000 /tmp/p20k.jsonl
      "$BIN" bench-embed --device cuda --model "$MODEL" --input /tmp/p20k.jsonl --texts 2000 \
        --verify 2000 --batch-sizes 32 --rounds 1 | tee "$OUT/verify.txt" ;;
    test) # the GPU test of tests/it: CUDA vectors vs CPU f32 on the reference fixture, truncated
      # 256-token prompts and 3,000 prompts in one call (cosine >= 0.999). The CPU side computes
      # in f32 from the carried f16 weights (within 0.999999 of the f32 weights' vectors).
      [ -x /tmp/it-cuda ] || { xz -dc dist/it-cuda-sm90.xz > /tmp/it-cuda && chmod +x /tmp/it-cuda; }
      PROMPT_RADAR_REPO=$PWD PROMPT_RADAR_MODEL=$MODEL /tmp/it-cuda --exact \
        embed_reference::cuda_vectors_match_cpu_f32_vectors --nocapture 2>&1 | tee "$OUT/test.txt"
      grep -q 'test result: ok. 1 passed' "$OUT/test.txt" \
        || { echo "the GPU test did not run (a binary built without --features cuda?)" >&2; exit 1; } ;;
    e2e) # text in -> normalised vectors on the host, tokenisation included, both systems
      prompts 20000 /tmp/p20k.jsonl
      "$BIN" bench-embed --device cuda --model "$MODEL" --input /tmp/p20k.jsonl --texts 20000 \
        --verify 0 --batch-sizes 32,128,512,1024,4096 --json "$OUT/ours-e2e.json" | tee "$OUT/e2e.txt"
      python3 benches/bench_embed_peer.py --model "$MODEL" --input /tmp/p20k.jsonl --texts 20000 \
        --batch-sizes 32,128,512,1024,4096 --ours "$OUT/ours-e2e.json" --json "$OUT/peer-e2e.json" \
        | tee -a "$OUT/e2e.txt" ;;
    model) # fixed 64-token batches, model only, both systems
      prompts 20000 /tmp/p20k.jsonl
      "$BIN" bench-embed --device cuda --model "$MODEL" --input /tmp/p20k.jsonl --texts 20000 \
        --verify 0 --fixed-tokens 64 --batch-sizes 32,128,512,1024 --json "$OUT/ours-model.json" \
        | tee "$OUT/model.txt"
      python3 benches/bench_embed_peer.py --model "$MODEL" --input /tmp/p20k.jsonl --texts 20000 \
        --fixed-tokens 64 --batch-sizes 32,128,512,1024 --ours "$OUT/ours-model.json" \
        --json "$OUT/peer-model.json" | tee -a "$OUT/model.txt" ;;
    reindex) # 1M sampled prompts embedded, stored and indexed; per-stage rates in the summary.
      # Without a terminal, reindex prints a progress line every 10 s: if the device's command
      # limit cuts the run short, the log that comes back still has the rate so far.
      # REINDEX_FLAGS adds flags, e.g. "--hnsw-ef-construction 64" (BENCHMARKS.md, "Ingest").
      prompts 1000000 /tmp/p1m.jsonl --traffic
      rm -rf /tmp/reindex-data
      limit=${REINDEX_LIMIT_S:-540}
      if [ -n "${SESSION_S:-}" ]; then
        left=$(( SESSION_S - ($(date +%s) - T0) - 20 ))
        [ "$left" -lt "$limit" ] && limit=$left
      fi
      echo "reindex: limit ${limit} s" | tee -a "$OUT/steps.txt"
      # shellcheck disable=SC2086 # REINDEX_FLAGS is a list of flags
      timev=(); [ -x /usr/bin/time ] && timev=(/usr/bin/time -v) # peak memory, where it is installed
      timeout "$limit" "${timev[@]}" "$BIN" reindex --device cuda \
        --model "$MODEL" --input /tmp/p1m.jsonl --data-dir /tmp/reindex-data --batch-size 4096 \
        ${REINDEX_FLAGS:-} 2>&1 | tee "$OUT/reindex.txt" ;;
    *) echo "unknown step $1 (verify test e2e model reindex all)" >&2; exit 2 ;;
  esac
}
# A failed check (verify, test) stops the session: timings of wrong vectors mean nothing. A failed
# measurement is reported and the next one still runs.
status=0
for step in "${steps[@]}"; do
  echo "== $step ($(( $(date +%s) - T0 )) s in)" | tee -a "$OUT/steps.txt"
  # The sampler is this shell's child: a step's subshell cannot wait for it.
  if [ "$step" = reindex ] && [ -n "$SAMPLER" ]; then wait "$SAMPLER" || true; fi
  set +e
  (set -e; run_step "$step")
  rc=$?
  set -e
  [ $rc -eq 0 ] && continue
  echo "== $step FAILED (exit $rc)" | tee -a "$OUT/steps.txt"
  status=$rc
  case $step in verify|test) exit $rc ;; esac
done
echo "== done ($(( $(date +%s) - T0 )) s in)" | tee -a "$OUT/steps.txt"
exit $status
