#!/usr/bin/env bash
# Issue 17: one language-conditioned policy over Meta-World MT10 on a CPU, the same recipe without images, and
# (ABLATIONS=1) the ablations that tell which knob matters. Every row is trained on the same demos with the same
# seed and evaluated on the same held-out positions (seeds from 1,000,000; demos use 0...).
#
#   bash benchmarks/vla_mt10.sh [workdir]              main recipe + no-image row  (needs: pip install -e '.[vla]';
#   ABLATIONS=1 bash benchmarks/vla_mt10.sh [workdir]  + cameras, window, chunk     apt-get install libosmesa6)
#   SMOKE=1 bash benchmarks/vla_mt10.sh [workdir]      2 tasks, a few demos/steps/episodes (what CI runs)
#   SIZE=128 STEPS=4000 DEMOS=100 bash ...             image size (px), training steps, demos per task
#   ONLY=chunk1,privileged_goal ABLATIONS=1 PRIVILEGED=1 bash benchmarks/vla_mt10.sh [workdir]
#                                                      only the rows named (same demos, same seeds)
#
# Rows run two at a time (JOBS=2, one torch thread each: the two cores of the CI-sized machine); each row's
# training and evaluation log is <workdir>/<row>.log.
# Writes <workdir>/results.md and results.json (per-task success, mean, train/eval seconds per row), each row's
# eval/ (eval_report.{md,json}, GIFs of the first success and the first failure per task) and times.txt.
# The demos record the state as proprio+goal; every row but one reads only proprio (--state_dims 0,1,2,3: hand
# xyz + gripper opening), so images are how it sees the task. PRIVILEGED=1 adds the row that also reads the goal
# position, which only a simulator knows; results.md names each row's state.
set -euo pipefail
W=${1:-runs/vla_mt10}
export OMP_NUM_THREADS=1 MUJOCO_GL=${MUJOCO_GL:-osmesa} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-osmesa}
mkdir -p "$W"
touch "$W/times.txt" && sed -i '/^wall /d' "$W/times.txt"  # a re-run keeps the times of the steps it skips
timed() {  # timed NAME command...: runs it, appends "NAME seconds" to times.txt
  local name=$1 t0=$SECONDS; shift
  "$@"
  echo "$name $((SECONDS - t0))" >> "$W/times.txt"
}

if [ "${SMOKE:-0}" = 1 ]; then
  TASKS=reach-v3,drawer-close-v3 DEMOS=3 VAL=1 STEPS=20 EPISODES=2 BUDGET=30 SIZE=64 DEMO_STEPS=150
  MODEL=(--tiny_size xs)
else
  TASKS=mt10 DEMOS=${DEMOS:-30} VAL=3 STEPS=${STEPS:-8000} EPISODES=${EPISODES:-20} BUDGET=${BUDGET:-300}
  SIZE=${SIZE:-96} DEMO_STEPS=300 MODEL=()
fi
# The rows this run can have; ONLY= picks some of them, checked here, before anything is recorded or trained.
ONLY=${ONLY:-}
ALL_ROWS=(images no_images)
if [ "${ABLATIONS:-0}" = 1 ]; then ALL_ROWS+=(cameras window4 chunk1 chunk8); fi
if [ "${PRIVILEGED:-0}" = 1 ]; then ALL_ROWS+=(privileged_goal); fi
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
for name in ${ONLY//,/ }; do
  [[ " ${ALL_ROWS[*]} " == *" $name "* ]] || { echo "vla_mt10.sh: ONLY=$ONLY names no row of this run ($name);" \
    "its rows: ${ALL_ROWS[*]} (cameras, window4, chunk1, chunk8 need ABLATIONS=1, privileged_goal PRIVILEGED=1)" >&2
    exit 2; }
done
if [ -n "$ONLY" ] && [ -z "${ONLY//,/}" ]; then echo "vla_mt10.sh: ONLY=$ONLY names no row" >&2; exit 2; fi

MAIN_CAM=${MAIN_CAM:-corner} CAMS=${CAMS:-corner,topview}
# The cameras the rows need are rendered once; the trajectories (seeds, expert, action noise) do not depend on them.
DEMO_CAMS=$MAIN_CAM
if [ "${ABLATIONS:-0}" = 1 ] && wanted cameras; then DEMO_CAMS=$CAMS; fi
D="$W/demos_${DEMO_CAMS//,/+}_${SIZE}px"  # recorded, trained and evaluated at SIZE px
[ -f "$D/metaworld_demos.json" ] || timed demos python -m vltune.vla.data.metaworld_demos --tasks "$TASKS" \
  --episodes "$DEMOS" --val_episodes "$VAL" --image_size "$SIZE" --cameras "$DEMO_CAMS" --max_steps "$DEMO_STEPS" \
  --state proprio+goal --out "$D"

TRAIN=(--action_head lstm --train_type full --readout action+image --head_input_norm batch --image_aug_shift 0
       --image_size "$SIZE" --learning_rate 1e-3 --warmup_steps 30 --max_steps "$STEPS" --seed 0
       --per_device_train_batch_size 32 --save_steps 1000 --logging_steps 50 --save_top_k 1 "${MODEL[@]}")
ROWS=()
JOBS=${JOBS:-2}  # rows trained + evaluated at once, one torch thread each: one per core of a 2-core machine
run_row() {
  local name=$1; shift
  [ -f "$W/$name/policy_config.json" ] || timed "train_$name" vltune vla --dataset "$D" "${TRAIN[@]}" "$@" \
    --output_dir "$W/$name" > "$W/$name.log" 2>&1
  [ -f "$W/$name/eval/eval_report.json" ] || timed "eval_$name" vltune eval vla --policy "$W/$name" --env metaworld \
    --tasks "$TASKS" --episodes "$EPISODES" --max_episode_steps "$BUDGET" --image_size "$SIZE" \
    --train_data "$D" --output_dir "$W/$name/eval" >> "$W/$name.log" 2>&1
  grep -h "\[eval\] mean success" "$W/$name.log" | tail -1 || true
}
row() {  # row NAME DESCRIPTION train-flags...: train on $D and evaluate on the held-out positions, in the background
  local name=$1 desc=$2; shift 2
  wanted "$name" || return 0
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  echo "[mt10] row $name: $desc (log: $W/$name.log)"
  run_row "$name" "$@" &
  ROWS+=("$name=$desc")
}
HONEST=(--state_dims 0,1,2,3)  # proprio only: the demos' state columns 4-6 are the simulator's goal position
IMAGES="images ($MAIN_CAM, $SIZE px)"  # the label of every row that reads the main camera

row images "$IMAGES, window 1, chunk 4" --cameras "$MAIN_CAM" --window_size 1 --fwd_pred_next_n 4 "${HONEST[@]}"
row no_images "no images (instruction + proprio)" --use_images false --window_size 1 --fwd_pred_next_n 4 "${HONEST[@]}"
if [ "${ABLATIONS:-0}" = 1 ]; then
  row cameras "images ($CAMS, $SIZE px), window 1, chunk 4" --cameras "$CAMS" --window_size 1 --fwd_pred_next_n 4 "${HONEST[@]}"
  row window4 "$IMAGES, window 4, chunk 4" --cameras "$MAIN_CAM" --window_size 4 --fwd_pred_next_n 4 "${HONEST[@]}"
  row chunk1 "$IMAGES, window 1, chunk 1" --cameras "$MAIN_CAM" --window_size 1 --fwd_pred_next_n 1 "${HONEST[@]}"
  row chunk8 "$IMAGES, window 1, chunk 8" --cameras "$MAIN_CAM" --window_size 1 --fwd_pred_next_n 8 "${HONEST[@]}"
fi
if [ "${PRIVILEGED:-0}" = 1 ]; then
  row privileged_goal "$IMAGES + the goal position (PRIVILEGED)" --cameras "$MAIN_CAM" --window_size 1 \
    --fwd_pred_next_n 4 --state_dims all
fi
for pid in $(jobs -p); do wait "$pid"; done  # a row that failed stops the script here, with its log named above
echo "wall $SECONDS" >> "$W/times.txt"
python benchmarks/vla_results.py "$W" "${ROWS[@]}"
