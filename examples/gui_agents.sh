#!/usr/bin/env bash
# seeds/04 end to end at demo scale, on the embedded tiny Qwen3-VL, offline, on a CPU:
# synthetic users -> global model over users 11-83 -> one adapter per test user (1-10) ->
# zero-shot vs global vs most-frequent-app baseline vs personalised on the test users' held-out screens.
#   bash examples/gui_agents.sh [OUT] [SEED]     (OUT defaults to output/gui, SEED to 0)
# SEED covers the data (users' habits, screens), the global model's training and the adapters'.
# NPROC (default 2, one per core) processes train the global model side by side (torchrun, DDP over gloo:
# a batch of 16 split over them) and NPROC workers train the adapters (each on every NPROC-th user).
# The tiny model reads one vision token per icon cell: 512 px screenshots resized to 128 px
# (--max_pixels 16384), saved with the processor so personalize/eval/infer resize the same way.
# --tiny_size s: the embedded model whose vision tower got a head start (see the demo); the global model
# also trains its projector (--freeze_aligner false), the vision tower stays frozen.
# Each step's wall and CPU time goes to stderr and to OUT/times.txt.
set -euo pipefail
OUT=${1:-output/gui}
SEED=${2:-0}
NPROC=${NPROC:-2}
case "$NPROC" in 1|2|4|8|16) ;; *)  # the global batch is 16 = NPROC x per-process batch: any other NPROC changes it
  echo "gui_agents.sh: NPROC=$NPROC does not divide the batch of 16; use 1, 2, 4, 8 or 16" >&2; exit 2 ;; esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
: > "$OUT/times.txt"
step() {  # step NAME COMMAND...: run it, then log its wall / user / sys seconds
    local name=$1; shift
    local TIMEFORMAT="$name: %R s wall, %U s user, %S s sys"
    { time "$@" 2>&3 ; } 3>&2 2>>"$OUT/times.txt"
    tail -n 1 "$OUT/times.txt" >&2
}

step data vltune data synth gui --preset seeds_small --seed "$SEED" --out "$OUT/data"

step global torchrun --standalone --nproc_per_node "$NPROC" -m vltune sft --dataset "$OUT/data/train.jsonl" \
    --users 11-83 --tiny_size s --train_type full --freeze_aligner false --max_pixels 16384 --num_train_epochs 4 \
    --learning_rate 1e-3 --per_device_train_batch_size $((16 / NPROC)) --warmup_steps 0.05 \
    --lr_scheduler_type cosine --weight_decay 0 --gradient_checkpointing false --save_strategy no \
    --logging_steps 50 --seed "$SEED" --output_dir "$OUT/global"

# Each adapter trains on its user's rows plus as many explicit rows of the training users (replay: they
# keep the adapter finding named apps), and must beat the global model on the user's held-out screens
# (the guard) or the user keeps the global model.
step personalize vltune personalize --base "$OUT/global" --dataset "$OUT/data/train.jsonl" --users 1-10 \
    --workers "$NPROC" --replay_users 11-83 --replay_where kind=explicit --replay_ratio 1 --guard_ratio 0.1 \
    --train_type lora --lora_rank 16 --lora_alpha 32 --lora_dropout 0 --learning_rate 3e-3 \
    --num_train_epochs 8 --per_device_train_batch_size 16 --warmup_steps 0.1 --lr_scheduler_type cosine \
    --gradient_checkpointing false --save_strategy no --logging_steps 10 --report_to none --seed "$SEED" \
    --output_dir "$OUT/personal"

step eval vltune eval grounding --model "$OUT/global" --per_user_adapters "$OUT/personal" --zero_shot auto \
    --frequent_app_baseline "$OUT/data/train.jsonl" \
    --dataset "$OUT/data/test.jsonl" --users 1-10 --output_dir "$OUT/eval"
