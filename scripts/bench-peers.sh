#!/usr/bin/env bash
# Prefill and decode side by side: `tessera bench`, llama.cpp's `llama-bench` and
# ik_llama.cpp's, alternated type by type on the same files, RUNS times, each result in
# OUT/RUN-ENGINE-TYPE.json; `scripts/bench-peers-table.py OUT` then prints the table of
# docs/benchmarks.md. The peers are measuring instruments built outside this tree (the recipe
# is in docs/benchmarks.md); an engine whose llama-bench is not given is left out.
#   LLAMA_BENCH=/path/llama-bench IK_BENCH=/path/llama-bench scripts/bench-peers.sh OUT [build]
# Environment: TYPES (q4_0 q8_0 q4_k_m f16), RUNS (2), THREADS (1,2), P (512), N (64), REPS (2),
# MODELS (the folder of tl-TYPE.gguf, made with `tessera synth --shape tinyllama-1.1b` when
# missing: /tmp), TESSERA_ARGS (more arguments for tessera bench, e.g. a config file),
# PEER_ARGS (more arguments for both llama-bench, e.g. `-fa 1`), IK_ARGS (more for
# ik_llama.cpp's alone, e.g. `-rtr 1`, its run-time repacking).
set -euo pipefail
top="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?usage: scripts/bench-peers.sh OUT [build-folder]}"
bin="${2:-$top/build}/tessera"
types="${TYPES:-q4_0 q8_0 q4_k_m f16}"
runs="${RUNS:-2}" threads="${THREADS:-1,2}" p="${P:-512}" n="${N:-64}" reps="${REPS:-2}"
models="${MODELS:-/tmp}"
mkdir -p "$out"

for t in $types; do
    [ -s "$models/tl-$t.gguf" ] ||
        "$bin" synth --shape tinyllama-1.1b --type "$t" -o "$models/tl-$t.gguf" >/dev/null
done

{
    echo "date: $(date -u +%FT%TZ)"
    echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
    echo "tessera: $(git -C "$top" rev-parse --short HEAD)$(git -C "$top" diff --quiet || echo +)"
    for peer in "${LLAMA_BENCH:-}" "${IK_BENCH:-}"; do
        [ -n "$peer" ] && echo "peer: $peer" \
            "$(git -C "$(dirname "$peer")" rev-parse --short HEAD 2>/dev/null || echo "(not a git checkout)")"
    done
    echo "settings: -p $p -n $n -t $threads, $reps repetitions, $runs runs; tessera" \
        "${TESSERA_ARGS:-(defaults)}; peers ${PEER_ARGS:-(defaults)}; ik_llama.cpp" \
        "${IK_ARGS:-(defaults)}"
} >"$out/info.txt"

for run in $(seq 1 "$runs"); do
    for t in $types; do
        model="$models/tl-$t.gguf"
        echo "run $run $t: tessera $(date -u +%T)" >&2
        # shellcheck disable=SC2086
        "$bin" bench -m "$model" ${TESSERA_ARGS:-} -p "$p" -n "$n" -t "$threads" -r "$reps" \
            --json >"$out/$run-tessera-$t.json"
        if [ -n "${LLAMA_BENCH:-}" ]; then
            echo "run $run $t: llama.cpp $(date -u +%T)" >&2
            # shellcheck disable=SC2086
            "$LLAMA_BENCH" -m "$model" ${PEER_ARGS:-} -p "$p" -n "$n" -t "$threads" -r "$reps" -o json \
                >"$out/$run-llama.cpp-$t.json" 2>/dev/null
        fi
        if [ -n "${IK_BENCH:-}" ]; then
            echo "run $run $t: ik_llama.cpp $(date -u +%T)" >&2
            # shellcheck disable=SC2086
            "$IK_BENCH" -m "$model" ${PEER_ARGS:-} ${IK_ARGS:-} -p "$p" -n "$n" -t "$threads" -r "$reps" -o json \
                >"$out/$run-ik_llama.cpp-$t.json" 2>/dev/null
        fi
    done
done
echo "done $(date -u +%T): scripts/bench-peers-table.py $out" >&2
