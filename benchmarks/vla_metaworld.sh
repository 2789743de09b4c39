#!/usr/bin/env bash
# Item 7 of the VLA issue, end to end on CPU: scripted Meta-World demos -> one language-conditioned multi-task
# policy on the embedded tiny Qwen3-VL (full fine-tuning, LSTM head, 4000 steps, <= 20 min) -> the same recipe without
# images (the ablation) -> closed-loop success within 150 steps on held-out positions, 20 episodes per task.
#   bash benchmarks/vla_metaworld.sh [workdir]        (needs: pip install -e '.[vla]'; apt-get install libosmesa6)
set -euo pipefail
W=${1:-runs/vla_metaworld}
TASKS=button-press-topdown-v3,drawer-open-v3,drawer-close-v3,reach-v3,push-v3
export OMP_NUM_THREADS=1 MUJOCO_GL=${MUJOCO_GL:-osmesa} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-osmesa}

[ -f "$W/demos/metaworld_demos.json" ] || python -m vltune.vla.data.metaworld_demos --tasks "$TASKS" \
  --episodes 50 --val_episodes 5 --image_size 96 --out "$W/demos"

TRAIN=(--dataset "$W/demos" --action_head lstm --window_size 1 --fwd_pred_next_n 4 --train_type full --readout action+image
       --head_input_norm batch --image_aug_shift 0
       --learning_rate 1e-3 --warmup_steps 30 --max_steps 4000 --train_seconds 1200
       --per_device_train_batch_size 32 --save_steps 1000 --logging_steps 50 --save_top_k 2)
vltune vla "${TRAIN[@]}" --output_dir "$W/policy_vlm"
vltune vla "${TRAIN[@]}" --use_images false --output_dir "$W/policy_blind"

for P in policy_vlm policy_blind; do
  vltune eval vla --policy "$W/$P" --env metaworld --tasks "$TASKS" --episodes 20 --max_episode_steps 150 \
    --train_data "$W/demos"
done
