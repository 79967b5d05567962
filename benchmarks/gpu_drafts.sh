#!/usr/bin/env bash
# The shipped SmolLM2 drafts at a GPU's budget: hidden states over many ShareGPT conversations, then a HASS and an
# EAGLE-2 draft on the same data, epochs, schedule and seed, packed (`pack-draft`: bf16, no embedding copy). Only
# the project's own commands run; the same script on a CPU with small numbers is its smoke test.
#
#   benchmarks/gpu_drafts.sh stage              # here: .gpu/ (ignored) gets the GGUF in two parts, ShareGPT, xz'd
#   device run 1: carry .gpu/a, command `true`  # the device tool carries 64 MiB a call; ignored files stay there
#   device run 2: carry .gpu/b, command `benchmarks/gpu_drafts.sh run $OUT cuda`
#   benchmarks/gpu_drafts.sh run OUT [cpu|cuda] [records] [epochs]   # defaults: cuda, 4000, 4
#
# OUT gets data.log, train-RECIPE.json (the last epoch's metrics) and RECIPE.tar (the packed draft: the device
# tool returns at most 8 files), to unpack into hass_deploy/drafts/smollm2-RECIPE/ with the command in its README.
# Sizes for a 15-minute H100 lease: 4000 records up to 2048 tokens is about 3 M tokens of hidden states.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=.gpu
case "${1:?usage: gpu_drafts.sh stage | run OUT [device] [records] [epochs]}" in
stage)
    grep -qx "/$stage/" .git/info/exclude 2>/dev/null || echo "/$stage/" >> .git/info/exclude
    mkdir -p "$stage/a" "$stage/b"
    gguf=$(python -c "from hass_deploy.packages import MODELS, named; print(named('smollm2', MODELS))")
    sharegpt=$(python -c "from hass_deploy.packages import DATASETS, named; print(named('sharegpt', DATASETS))")
    half=$(( $(stat -c %s "$gguf") / 2 ))
    head -c "$half" "$gguf" > "$stage/a/model.gguf.0"
    tail -c +"$(( half + 1 ))" "$gguf" > "$stage/b/model.gguf.1"
    # Its first 40 MB (about 6,000 conversations), xz'd: the data command stops cleanly at the cut-off last record.
    head -c 40000000 "$sharegpt" | xz -T2 -6 -c > "$stage/b/sharegpt.json.xz"
    # The pure-Python dependencies a bare CUDA machine may lack (no network there): installed only where missing.
    pip download --no-deps -q -d "$stage/a/wheels" gguf accelerate typer rich shellingham markdown-it-py mdurl pygments
    du -sh "$stage"/a "$stage"/b
    ;;
run)
    out=${2:?usage: gpu_drafts.sh run OUT [device] [records] [epochs]}
    device=${3:-cuda} records=${4:-4000} epochs=${5:-4}
    pip install -q --no-index --find-links "$stage/a/wheels" gguf accelerate typer rich
    command -v hass-deploy >/dev/null || pip install -q --no-deps --no-build-isolation -e .
    work=$stage/work && mkdir -p "$work" "$out"
    [ -f "$work/model.gguf" ] || cat "$stage"/a/model.gguf.0 "$stage"/b/model.gguf.1 > "$work/model.gguf"
    [ -f "$work/sharegpt.json" ] || xz -dc "$stage/b/sharegpt.json.xz" > "$work/sharegpt.json"
    export HASS_DEPLOY_HOME=$work/home
    hass-deploy data --target "$work/model.gguf" --dataset "$work/sharegpt.json" --format sharegpt \
        --max-samples "$records" --max-length 2048 --device "$device" --seed 0 --out "$work/data" --force \
        --no-progress 2>&1 | tee "$out/data.log" | tail -2
    for recipe in eagle2 hass; do
        hass-deploy train --target "$work/model.gguf" --data "$work/data" --out "$work/$recipe" --recipe "$recipe" \
            --epochs "$epochs" --lr 2e-3 --batch-size 8 --max-length 2048 --draft-vocab 8192 --seed 0 \
            --device "$device" --no-progress --resume 2>&1 | tail -1 | tee "$out/train-$recipe.json"
        hass-deploy pack-draft "$work/$recipe" --data "$work/data" --out "$work/packed-$recipe" --force >/dev/null
        tar -C "$work/packed-$recipe" -cf "$out/$recipe.tar" .
    done
    ;;
*) echo "usage: gpu_drafts.sh stage | run OUT [device] [records] [epochs]" >&2; exit 1 ;;
esac
