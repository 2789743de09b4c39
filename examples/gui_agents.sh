#!/usr/bin/env bash
# seeds/04 end to end at demo scale, on the embedded tiny Qwen3-VL, offline, on a CPU:
# synthetic users -> global model over users 11-83 -> one adapter per test user (1-10) ->
# zero-shot vs global vs personalised on the test users' held-out screens.
#   bash examples/gui_agents.sh [OUT]        (OUT defaults to output/gui)
# The tiny model reads one vision token per icon cell: 512 px screenshots resized to 128 px
# (--max_pixels 16384), saved with the processor so personalize/eval/infer resize the same way.
# --tiny_size s: the embedded model whose vision tower got a head start (see the demo).
set -euo pipefail
OUT=${1:-output/gui}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

vltune data synth gui --preset seeds_small --out "$OUT/data"

vltune sft --dataset "$OUT/data/train.jsonl" --users 11-83 --tiny_size s --train_type full --max_pixels 16384 \
    --num_train_epochs 2 --learning_rate 1e-3 --per_device_train_batch_size 16 --warmup_steps 0.05 \
    --lr_scheduler_type cosine --weight_decay 0 --gradient_checkpointing false --save_strategy no \
    --logging_steps 50 --output_dir "$OUT/global"

vltune personalize --base "$OUT/global" --dataset "$OUT/data/train.jsonl" --users 1-10 \
    --train_type lora --lora_rank 16 --lora_alpha 32 --lora_dropout 0 --learning_rate 1e-3 \
    --num_train_epochs 4 --per_device_train_batch_size 16 --warmup_steps 0.1 --lr_scheduler_type cosine \
    --gradient_checkpointing false --save_strategy no --logging_steps 10 --report_to none \
    --output_dir "$OUT/personal"

vltune eval grounding --model "$OUT/global" --per_user_adapters "$OUT/personal" --zero_shot auto \
    --dataset "$OUT/data/test.jsonl" --users 1-10 --output_dir "$OUT/eval"
