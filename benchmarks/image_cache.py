"""SFT with and without the in-memory image cache (`--image_cache_mb`), side by side in one run.

Not part of CI. Two parts:

1. `vltune sft` on the GUI-agent data (`vltune data synth gui`, 512 px PNG screenshots resized to 128 px by
   the processor: the workflow of examples/gui_agents.sh) for --epochs epochs over the first --samples rows,
   once with `--image_cache_mb 0` and once with the default, everything else equal (same seed). It prints
   wall time, training time and samples/s of each, and checks that the two runs logged the same losses at
   every logged step: the cache must not change what the model sees.
2. The data path alone, per image, for screenshot sizes a real GUI set has (PNG, a Qwen-VL processor at its
   own max_pixels and at 1003520): read + decode + the processor's resize, against a
   load from the cache.

    python benchmarks/image_cache.py                  # both parts, ~5 min on 2 CPU cores
    python benchmarks/image_cache.py --samples 600 --epochs 2 --skip_images
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def train(data: Path, out: Path, cache_mb: float, args) -> dict:
    cmd = [sys.executable, "-m", "vltune", "sft", "--dataset", str(data / "train.jsonl"), "--users", "11-83",
           "--num_samples", str(args.samples), "--tiny_size", "s", "--train_type", "full", "--max_pixels", "16384",
           "--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
           "--gradient_checkpointing", "false", "--save_strategy", "no", "--logging_steps", "10",
           "--report_to", "none", "--seed", "0", "--image_cache_mb", str(cache_mb), "--output_dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.time()
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    if rc:
        sys.exit(f"vltune sft --image_cache_mb {cache_mb} failed (rc {rc}); see {log}")
    results = json.loads((out / "train_results.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]
    cache_line = next((line.split("image cache: ", 1)[1] for line in log.read_text().splitlines()
                       if "image cache: " in line), "-")
    return {"wall": wall, "train": results["train_runtime"], "samples_per_s": results["train_samples_per_second"],
            "losses": losses, "cache": cache_line}


def data_path(sizes, budgets, repeats: int) -> list[tuple]:
    import numpy as np
    from PIL import Image

    from vltune.data.image_cache import ImageCache
    from vltune.data.images import load_image
    from vltune.models.load import load_processor
    from vltune.models.tiny import tiny_model_path

    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in sizes:
            # a screenshot-like PNG: flat panels and a little noise (compresses like real UI captures)
            img = np.full((h, w, 3), 244, np.uint8)
            for _ in range(40):
                x, y = rng.integers(0, w - 40), rng.integers(0, h - 40)
                img[y:y + rng.integers(20, 200), x:x + rng.integers(20, 300)] = rng.integers(0, 256, 3)
            img[rng.random((h, w)) < 0.02] = 0
            path = f"{tmp}/{w}x{h}.png"
            Image.fromarray(img).save(path)
            for budget in budgets:
                processor = load_processor(tiny_model_path("qwen2_5_vl", "xs"), max_pixels=budget)
                ip = processor.image_processor
                ip.patch_size, ip.merge_size = 14, 2  # Qwen2.5-VL's real patching (28 px per token)
                t0 = time.perf_counter()
                for _ in range(repeats):
                    ip(images=[load_image(path)], return_tensors="np")
                plain = (time.perf_counter() - t0) / repeats
                cache = ImageCache(processor, 4096)
                cache.load(path)
                t0 = time.perf_counter()
                for _ in range(repeats):
                    ip(images=[cache.load(path)], return_tensors="np")
                cached = (time.perf_counter() - t0) / repeats
                rows.append((f"{w}x{h}", budget, cache.load(path).size, plain * 1e3, cached * 1e3))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1200, help="rows of the GUI set to train on")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--data", help="an existing `vltune data synth gui` dir (default: made in a temp dir)")
    ap.add_argument("--skip_images", action="store_true", help="skip part 2")
    ap.add_argument("--skip_train", action="store_true", help="skip part 1")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_train:
            data = Path(args.data) if args.data else Path(tmp) / "gui"
            if not args.data:
                subprocess.check_call([sys.executable, "-m", "vltune", "data", "synth", "gui", "--preset",
                                       "seeds_small", "--seed", "0", "--out", str(data)], stdout=subprocess.DEVNULL)
            runs = {mb: train(data, Path(tmp) / f"cache_{mb}", mb, args) for mb in (0, 1024)}
            print(f"\n## vltune sft, GUI set: {args.samples} rows x {args.epochs} epochs, batch 8, one process")
            print("| --image_cache_mb | wall s | train s | samples/s | cache |\n|---|---|---|---|---|")
            for mb, r in runs.items():
                print(f"| {mb} | {r['wall']:.0f} | {r['train']:.0f} | {r['samples_per_s']:.1f} | {r['cache']} |")
            same = runs[0]["losses"] == runs[1024]["losses"]
            print(f"\nlogged losses identical at all {len(runs[0]['losses'])} logged steps: {same}; "
                  f"training time {runs[0]['train'] / runs[1024]['train']:.2f}x faster with the cache")
            if not same:
                sys.exit("the cache changed the losses: a bug")
        if not args.skip_images:
            # Qwen2.5-VL's own max_pixels (12845056) and the 1003520 GUI-agent recipes often set
            rows = data_path([(1080, 2400), (1920, 1080), (2560, 1440)], [12845056, 1003520], repeats=10)
            print("\n## data path per image: read + decode + processor (resize, normalise, patches), ms")
            print("| screenshot | max_pixels | cached size | from file | from cache |\n|---|---|---|---|---|")
            for name, budget, size, plain, cached in rows:
                print(f"| {name} | {budget} | {size[0]}x{size[1]} | {plain:.1f} | {cached:.1f} |")


if __name__ == "__main__":
    main()
