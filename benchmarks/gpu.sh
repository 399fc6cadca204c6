#!/usr/bin/env bash
# On one GPU (bf16), from the repository root after `bash launch/bootstrap.sh`; results under $OUT:
#  1. the MoE layer against the dense FFN with the same capacity predictor, DeepSpeed's top-1 MoE and
#     itself compiled, S and L width, 8K and 64K tokens, E=8 and 16 (benchmarks/moe_layer.py);
#  2. the combine alone: segment sum (no atomics) against index_add (benchmarks/moe_layer.py --combine);
#  3. training steps of DiffMoE-L-E8 (configs/imagenet/diffmoe_l_e8_flow.yaml) in bf16 with ZeRO 1 on
#     random latents, without and with activation checkpointing, eager and compiled (train.compile): every
#     log line gives TFLOP/s and MFU, metrics.jsonl the phase times (data, forward, backward, optimizer).
# Usage: bash benchmarks/gpu.sh [OUT] (default runs/gpu_bench); PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_bench}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; git rev-parse HEAD; } \
    | tee "$OUT/machine.txt"

"$PY" benchmarks/moe_layer.py --device cuda --dtype bf16 --repeats 10 --sizes S,L --tokens 8192,65536 \
    --experts 8,16 --baselines dense,dense_predictor,deepspeed,compiled | tee "$OUT/moe_layer.txt"
"$PY" benchmarks/moe_layer.py --device cuda --combine --repeats 10 --sizes S,L --tokens 8192,65536 \
    --experts 8,16 | tee "$OUT/combine.txt"

"$PY" benchmarks/random_latents.py "$OUT/latents" --images 2048
for compiled in false true; do
    for checkpointing in false true; do
        run="l_e8_ac_${checkpointing}_compile_$compiled"
        "$PY" pretrain_diffmoe.py --config configs/imagenet/diffmoe_l_e8_flow.yaml \
            --set data.path="$OUT/latents" --set data.hflip=false --set train.precision=bf16 \
            --set parallel.zero_stage=1 --set parallel.activation_checkpointing=$checkpointing \
            --set train.compile=$compiled \
            --set train.global_batch_size=64 --set train.max_steps=40 --set logging.every_steps=10 \
            --set checkpoint.every_steps=0 --set sample.per_class=1 --set sample.steps=2 \
            --set train.out_dir="$OUT/$run" --resume none | tee "$OUT/$run.txt"
    done
done
