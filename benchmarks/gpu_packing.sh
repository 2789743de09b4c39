#!/usr/bin/env bash
# GPU checks for issue 19 (packing), prepared as one script for the lent device machine (run from the repo root):
#   bash benchmarks/gpu_packing.sh [OUT_DIR]
# 1. the loss-equivalence tests on CUDA with flash_attention_2 (varlen through position_ids) when flash-attn is
#    installed, else sdpa; 2. vltune sft --packing on the tiny model with --attn_impl flash_attention_2 and
#    --use_liger_kernel (each skipped with a message if its package is missing); 3. the realistic 3B-sized
#    throughput run (vltune vs TRL, bf16, MFU). Each step has its own time limit.
set -u
OUT=${1:-${OUT:-/tmp/gpu_packing}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
has() { python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# 1. equivalence on the GPU: packed logits vs one sample at a time, per family
ATTN=sdpa; has flash_attn && ATTN=flash_attention_2
echo "[gpu] attention for the checks: $ATTN" | tee -a "$OUT/gpu.txt"
timeout 300 python - <<PY 2>&1 | tail -20 | tee "$OUT/equivalence.txt"
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText
from vltune.data.dataset import SFTCollator
from vltune.data.formats import normalize_row
from vltune.data.packing import PaddingFreeCollator, find_rope_index
from vltune.models.load import load_processor
from vltune.models.tiny import tiny_model_path
rows = [{"messages": [{"role": "user", "content": "<image>Click the red circle"}, {"role": "assistant", "content": "click(1, 2)"}], "images": [Image.new("RGB", (64, 64), (200, 0, 0))]},
        {"messages": [{"role": "user", "content": "<image>and <image>"}, {"role": "assistant", "content": "a longer answer here"}], "images": [Image.new("RGB", (96, 64), (0, 200, 0)), Image.new("RGB", (64, 128), (0, 0, 200))]}]
for fam in ("qwen3_vl", "qwen2_5_vl", "qwen2_vl", "idefics3"):
    p = tiny_model_path(fam, "xs"); proc = load_processor(p)
    m = AutoModelForImageTextToText.from_pretrained(p, dtype=torch.bfloat16, attn_implementation="$ATTN").cuda().eval()
    feats = [{"sample": normalize_row(r, None, f"t:{i}"), "images": r["images"]} for i, r in enumerate(rows)]
    singles = [SFTCollator(proc)([f]) for f in feats]
    flat = PaddingFreeCollator(proc, rope_index=find_rope_index(m))(feats)
    dev = lambda b: {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}
    with torch.no_grad():
        ref = torch.cat([m(**dev(s)).logits[0] for s in singles]).float()
        got = m(**dev({k: v for k, v in flat.items() if k not in ("labels", "shift_labels")})).logits[0].float()
    print(fam, "$ATTN", "max |logit diff| packed vs one-by-one:", (ref - got).abs().max().item())
PY

# 2. vltune sft --packing with flash-attn / Liger on the tiny model (30 steps)
for opt in "--attn_impl flash_attention_2" "--use_liger_kernel true" ""; do
  tag=$(echo "${opt:-sdpa}" | tr -c 'a-z0-9_\n' '_')
  timeout 240 python -m vltune sft --model_family qwen2_5_vl --packing true --max_steps 30 --bf16 true \
    --per_device_train_batch_size 2 --output_dir "$OUT/sft_$tag" --report_to none --logging_steps 10 $opt \
    > "$OUT/sft_$tag.log" 2>&1; echo "[gpu] sft --packing $opt: rc=$?" | tee -a "$OUT/gpu.txt"
  grep -E "tokens per optimizer step|train_loss|needs the" "$OUT/sft_$tag.log" | tail -3 | tee -a "$OUT/gpu.txt"
done

# 3. realistic 3B-sized model: vltune vs TRL (bf16, MFU) on the uniform boards (the realistic-shape data set is CPU-sized)
timeout 420 python benchmarks/sft_throughput.py --config realistic --device cuda --steps 20 --warmup 5 \
  --timeout 200 --workdir "$OUT/bench" 2>&1 | tail -40 | tee "$OUT/realistic.txt"
