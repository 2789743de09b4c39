"""vltune demo: the whole SFT path on an embedded tiny VLM, offline, on a CPU, in minutes.

    vltune demo                                  # tiny Qwen3-VL, ~5-8 minutes on 2 CPU cores
    vltune demo --model_family idefics3 --output_dir demo_idefics3

1. builds the tiny model of the family (real architecture, processor and chat template) and loads it
   back with from_pretrained;
2. writes a synthetic grounding set ("Click the red circle" -> click(x, y) in the family's coordinates)
   as ms-swift JSONL + PNGs, with held-out boards never seen in training;
3. measures held-out click accuracy before training, trains with `vltune sft`, measures again;
4. writes results.json (accuracy before/after, the constant-answer baseline, timings), clicks.png
   (predicted vs true clicks on held-out boards), loss.png and everything `vltune sft` writes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..args import ModelArguments, SFTDataArguments, SFTTrainingArguments, TunerArguments, parse_args
from ..console import setup_logging
from ..hardware import torch_threads

logger = logging.getLogger("vltune")


@dataclass
class DemoArguments:
    model_family: str = field(default="qwen3_vl", metadata={
        "help": "Family of the embedded tiny model: qwen3_vl, qwen2_5_vl, qwen2_vl, idefics3."})
    output_dir: str = field(default="output/demo", metadata={"help": "Where data, model and results go."})
    tiny_size: str = field(default="s", metadata={
        "help": "s: the demo model (pretrained vision tower, random LLM); xs: a smaller random one for smoke tests."})
    n_train: int = field(default=24000, metadata={"help": "Synthetic training boards (each seen `epochs` times)."})
    n_test: int = field(default=200, metadata={"help": "Held-out boards for the accuracy figures."})
    grid: int = field(default=4, metadata={"help": "Board is grid x grid cells, one vision token per cell."})
    n_shapes: int = field(default=3, metadata={"help": "Up to this many shapes per board (the named one + distractors)."})
    cell_tokens: int = field(default=1, metadata={"help": "Vision tokens per cell edge (2 = each cell spans 2x2 tokens)."})
    train_type: str = field(default="full", metadata={"choices": ["full", "lora", "qlora"],
        "help": "full (default: the tiny model starts from random weights) | lora | qlora."})
    freeze_vit: bool = field(default=True, metadata={
        "help": "Freeze the vision tower and aligner (their head start comes with the tiny model); the LLM trains."})
    epochs: float = field(default=2.0, metadata={"help": "Training epochs."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    batch_size: int = field(default=16, metadata={"help": "Samples per step."})
    seed: int = field(default=0, metadata={"help": "Seed for data and training."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)."})


def run_demo(d: DemoArguments) -> dict:
    from ..data.formats import read_dataset
    from ..data.synthetic import make_grounding_set
    from ..eval.grounding import constant_answer_baseline, score_clicks
    from ..generation import generate_answers
    from ..eval.plots import plot_clicks
    from ..models.families import FAMILIES
    from ..models.load import load_model, load_processor
    from ..models.tiny import tiny_model_path, vision_cell_pixels
    from transformers import AutoConfig
    from ..train.sft import run_sft

    setup_logging()
    out = Path(d.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    path = tiny_model_path(d.model_family, d.tiny_size)
    family = FAMILIES[d.model_family]
    processor = load_processor(path)
    data = make_grounding_set(out / "data", n_train=d.n_train, n_test=d.n_test, grid=d.grid,
                              cell=vision_cell_pixels(AutoConfig.from_pretrained(path)) * d.cell_tokens, n_shapes=d.n_shapes, seed=d.seed,
                              convention=family.coords, processor=processor)
    train, _ = read_dataset(data["train"])
    test, _ = read_dataset(data["test"])
    logger.info("[demo] %d training boards, %d held-out boards (%dx%d grid, %d shapes, %d px)", len(train),
                len(test), d.grid, d.grid, d.n_shapes, data["image_size"])

    model_args = ModelArguments(model=path, model_family=d.model_family)
    before_model = load_model(path, model_args, for_training=False)
    before = score_clicks(test, generate_answers(before_model, processor, test, desc="eval before"), family.coords,
                          processor)
    del before_model
    baseline = constant_answer_baseline(train, test, family.coords, processor)
    logger.info("[demo] before training: held-out click accuracy %.1f%% (constant answer %r: %.1f%%)",
                100 * before["click_accuracy"], baseline["answer"], 100 * baseline["click_accuracy"])

    t_train = time.time()
    result = run_sft(
        model_args,
        TunerArguments(train_type=d.train_type, freeze_vit=d.freeze_vit, freeze_aligner=d.freeze_vit,
                       lora_rank=16, lora_alpha=32, lora_dropout=0.0),
        SFTDataArguments(dataset=[data["train"]], max_length=512),
        SFTTrainingArguments(
            output_dir=str(out / "model"), num_train_epochs=d.epochs, learning_rate=d.learning_rate,
            per_device_train_batch_size=d.batch_size, gradient_checkpointing=False, warmup_steps=0.05,
            lr_scheduler_type="cosine", weight_decay=0.0,
            logging_steps=max(1, min(20, int(len(train) / d.batch_size * d.epochs) // 20)), save_strategy="no",
            report_to=["tensorboard"], seed=d.seed, use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            overwrite_output_dir=True,  # the demo rebuilds its whole directory (data too) on every run
        ),
    )
    train_seconds = time.time() - t_train
    after_answers = generate_answers(result.model, processor, test, desc="eval after")
    after = score_clicks(test, after_answers, family.coords, processor)
    logger.info("[demo] after training: held-out click accuracy %.1f%% (before %.1f%%, constant answer %.1f%%)",
                100 * after["click_accuracy"], 100 * before["click_accuracy"], 100 * baseline["click_accuracy"])

    from ..data.images import load_image

    items = []
    for s, r in list(zip(test, after["per_sample"]))[:16]:
        t = s.extra["target"]
        items.append({"image": load_image(s.images[0]), "box": t["box"], "truth": t["point"], "pred": r["pred"],
                      "ok": r["ok"], "label": s.messages[0]["content"][-1]["text"]})
    plot_clicks(items, out / "clicks.png", title="held-out boards after training: true (green) vs predicted (red)")
    results = {
        "model_family": d.model_family,
        "model": path,
        "n_train": len(train),
        "n_test": len(test),
        "task": {k: data[k] for k in ("grid", "cell", "n_shapes", "image_size", "convention")},
        "click_accuracy_before": before["click_accuracy"],
        "click_accuracy_after": after["click_accuracy"],
        "constant_answer_baseline": baseline,
        "chance_of_a_random_cell": 1.0 / (d.grid * d.grid),
        "mean_distance_px_after": after["mean_distance_px"],
        "unparseable_rate_before": before["unparseable_rate"],
        "unparseable_rate_after": after["unparseable_rate"],
        "train_loss": result.metrics.get("train_loss"),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t0, 1),
        "examples_after": [{"prompt": s.messages[0]["content"][-1]["text"], "truth": s.messages[-1]["content"][0]["text"],
                            "answer": r["answer"], "ok": r["ok"]} for s, r in list(zip(test, after["per_sample"]))[:8]],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nvltune demo ({d.model_family}): held-out click accuracy {100 * before['click_accuracy']:.1f}% before -> "
          f"{100 * after['click_accuracy']:.1f}% after training "
          f"(constant answer: {100 * baseline['click_accuracy']:.1f}%); "
          f"trained {train_seconds:.0f} s, total {results['total_seconds']:.0f} s.\n"
          f"results: {out / 'results.json'}, clicks: {out / 'clicks.png'}, loss: {out / 'model' / 'loss.png'}")
    return results


def main(argv: list[str] | None = None) -> dict:
    (d,) = parse_args((DemoArguments,), argv, prog="vltune demo", description=__doc__)
    with torch_threads(d.threads):  # the caller's own setting comes back afterwards
        return run_demo(d)
