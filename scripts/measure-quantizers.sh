#!/usr/bin/env bash
# Measures each quantizer setting on stories260K: bits per weight, relative RMSE of the
# weights and perplexity on the TinyStories text (llama.cpp's definition), printed as the
# markdown rows of docs/quantizers.md. With SPEED_MODEL set to an F32 GGUF of a real shape
# (`tessera synth --shape tinyllama-1.1b --type f32 -o tl-f32.gguf`), each row also gets the
# decode and prefill speed of that model with the quantizer converting it at load (1 thread).
# ONLY, an extended regular expression, keeps the rows whose label it matches.
#   scripts/measure-quantizers.sh [build-folder]
set -euo pipefail
top="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$top/build}/tessera"
data="${TESSERA_TEST_DATA:-$top/../shared}"
model="$data/models/stories260K.gguf"
text="$data/data/tinystories_val.txt"
ctx="${CTX:-128}"

settings=(
    "gguf (keep: F32)|quantizer.plugin=gguf"
    "gguf q8_0|quantizer.plugin=gguf quantizer.type=q8_0"
    "gguf q5_1|quantizer.plugin=gguf quantizer.type=q5_1"
    "gguf q5_0|quantizer.plugin=gguf quantizer.type=q5_0"
    "gguf q4_1|quantizer.plugin=gguf quantizer.type=q4_1"
    "gguf q4_0|quantizer.plugin=gguf quantizer.type=q4_0"
    "rtn 8 bits, group 64|quantizer.plugin=rtn quantizer.bits=8"
    "rtn 8 bits, group 64, int8 activations|quantizer.plugin=rtn quantizer.bits=8 quantizer.act_bits=8"
    "rtn 6 bits, group 64|quantizer.plugin=rtn quantizer.bits=6"
    "rtn 4 bits, group 64|quantizer.plugin=rtn quantizer.bits=4"
    "rtn 4 bits, group 64, int8 activations|quantizer.plugin=rtn quantizer.bits=4 quantizer.act_bits=8"
    "rtn 4 bits, group 32, asymmetric|quantizer.plugin=rtn quantizer.bits=4 quantizer.group=32 quantizer.symmetric=false"
    "rtn 4 bits, group 32, asymmetric, int8 activations|quantizer.plugin=rtn quantizer.bits=4 quantizer.group=32 quantizer.symmetric=false quantizer.act_bits=8"
    "rtn 3 bits, group 32, asymmetric|quantizer.plugin=rtn quantizer.bits=3 quantizer.group=32 quantizer.symmetric=false"
    "rtn 3 bits, group 32, asymmetric, int8 activations|quantizer.plugin=rtn quantizer.bits=3 quantizer.group=32 quantizer.symmetric=false quantizer.act_bits=8"
    "rtn 2 bits, group 32, asymmetric|quantizer.plugin=rtn quantizer.bits=2 quantizer.group=32 quantizer.symmetric=false"
    "rtn 2 bits, group 32, asymmetric, int8 activations|quantizer.plugin=rtn quantizer.bits=2 quantizer.group=32 quantizer.symmetric=false quantizer.act_bits=8"
    "int6 (f32 activations)|quantizer.plugin=int6"
    "int6 (int8 activations)|quantizer.plugin=int6 quantizer.act_bits=8"
    "spqr (3 bits, group 16)|quantizer.plugin=spqr"
    "spqr (3 bits, group 16), int8 activations|quantizer.plugin=spqr quantizer.act_bits=8"
    "w4a8 (group 128)|quantizer.plugin=w4a8"
)

json_field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d$1)"; }

speed_model="${SPEED_MODEL:-}"
if [ -n "$speed_model" ]; then
    echo "| quantizer | bits/weight | relative RMSE | perplexity (ctx $ctx) | ± | decode tok/s | roofline | prefill tok/s | bits/weight (tinyllama) |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
else
    echo "| quantizer | bits/weight | relative RMSE | perplexity (ctx $ctx) | ± |"
    echo "| --- | ---: | ---: | ---: | ---: |"
fi
for s in "${settings[@]}"; do
    label="${s%%|*}"
    if [ -n "${ONLY:-}" ] && ! [[ "$label" =~ $ONLY ]]; then continue; fi
    sets=()
    for kv in ${s#*|}; do sets+=(--set "$kv"); done
    ppl_json="$("$bin" perplexity -m "$model" -f "$text" --ctx "$ctx" "${sets[@]}" --json 2>/dev/null)"
    bits="$(echo "$ppl_json" | json_field "['bits_per_weight']")"
    rmse="$(echo "$ppl_json" | json_field "['mean_rel_rmse']")"
    ppl="$(echo "$ppl_json" | json_field "['ppl']")"
    err="$(echo "$ppl_json" | json_field "['ppl_stderr']")"
    printf "| %s | %.3f | %.4f | %.4f | %.4f |" "$label" "$bits" "$rmse" "$ppl" "$err"
    if [ -n "$speed_model" ]; then
        bench="$("$bin" bench -m "$speed_model" -p 64 -n 32 -r 2 -t 1 "${sets[@]}" --json 2>/dev/null)"
        printf " %.2f | %.0f%% | %.1f | %.2f |" \
            "$(echo "$bench" | json_field "['results'][0]['decode_tps_mean']")" \
            "$(echo "$bench" | json_field "['results'][0]['roofline_fraction'] * 100")" \
            "$(echo "$bench" | json_field "['results'][0]['prefill_tps_mean']")" \
            "$(echo "$bench" | json_field "['results'][0]['bits_per_weight']")"
    fi
    echo
done
