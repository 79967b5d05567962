#!/usr/bin/env bash
# Our ONNX Runtime decoding and llama.cpp's on the same weights, prompts and threads, side by side: two rounds of
# [ours: standard / fused / int8 graphs, plain and prompt lookup] then [llama.cpp f32 and q8_0, plain and lookup],
# so each is measured between runs of the other. Medians per round go into OUT/*.json.
#
#   benchmarks/cpu_peers.sh TARGET ARTIFACTS INT8_ARTIFACTS PROMPTS LLAMA_BIN_DIR GGUF_F32 GGUF_Q8 OUT [PROMPTS_N]
set -euo pipefail
target=$1 artifacts=$2 int8=$3 prompts=$4 bin=$5 f32=$6 q8=$7 out=$8 n=${9:-12}
mkdir -p "$out"
here=$(dirname "$0")
for round in 1 2; do
  python "$here/cpu_plain.py" --target "$target" --artifacts "$artifacts" --int8-artifacts "$int8" \
      --prompts "$prompts" --max-prompts "$n" --new-tokens 128 --lookup --out "$out/ours-$round.json"
  for gguf in "$f32" "$q8"; do
    for mode in plain lookup; do
      python "$here/llama_cpp.py" --llama-bin-dir "$bin" --gguf "$gguf" --target "$target" --prompts "$prompts" \
          --max-prompts "$n" --new-tokens 128 --threads 2 --mode "$mode" --draft 8 --quiet \
          --out "$out/llama-$(basename "$gguf" .gguf)-$mode-$round.json"
    done
  done
done
