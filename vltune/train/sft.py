"""Supervised fine-tuning as a library function: `run_sft` (used by `vltune sft`, `vltune demo` and `vltune
personalize`), with its data (`build_datasets`) and model (`build_model`) steps.

Top to bottom: run directory -> processor -> data (validated, never truncated) -> model + tuner ->
gradient-flow preflight -> HF Trainer -> save adapter/weights, processor, logs and plots.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..arg_checks import check_users_have_data
from ..args import ModelArguments, SFTDataArguments, SFTTrainingArguments, TunerArguments
from ..data.dataset import DataReport, SFTCollator, SFTDataset, validate_samples
from ..data.errors import DataError
from ..data.formats import read_dataset
from ..data.image_cache import ImageCache
from ..data.splits import split_holdout
from ..errors import UsageError
from ..models.load import load_model
from ..models.tuners import apply_tuner, enable_gradient_checkpointing, format_summary, parameter_summary
from ..resume import wants_resume
from .debug import attach_debug_callback
from .memory import MemoryLogCallback
from .run import load_base, load_hint, log_preflight, open_run, resolve_resume, write_model_card
from .survive import WithSampleIds, survivable
from .survive import train as train_surviving

logger = logging.getLogger("vltune")


@dataclass
class SFTResult:
    output_dir: str
    metrics: dict
    data_report: DataReport
    model: torch.nn.Module
    processor: object


# ---------------------------------------------------------------------------- data
def build_datasets(data: SFTDataArguments, processor, seed: int, output_dir: str, convention: str,
                   samples: list | None = None, image_cache_mb: float = 0):
    """Read (unless `samples` are given), validate and split the data; return (train, eval or None, report).
    Both sets load their images through one ImageCache of `image_cache_mb` MiB (0: none)."""
    specs = list(data.dataset)
    if samples is not None:
        read_errors: list = []
    elif not specs:
        from ..data.synthetic import make_grounding_set

        check_users_have_data(data.users)

        made = make_grounding_set(Path(output_dir) / "demo_data", n_train=512, n_test=64, seed=seed,
                                  convention=convention, processor=processor)
        specs = [made["train"]]
        logger.info("[data] no --dataset given: using the demo's synthetic grounding set (%s)", made["train"])
    if samples is None:
        samples, read_errors = read_dataset(specs, users=data.users, allow_pickle=data.allow_pickle)
    if data.num_samples:
        samples = samples[: data.num_samples]
    limit = min(data.max_length, data.packing_length) if data.packing and data.packing_length else data.max_length
    kept, lengths, report = validate_samples(samples, processor, limit, data.loss_scale, read_errors)
    report.log("train")
    if report.skipped and data.strict:
        raise report.strict_error("sample")
    if not kept:
        raise DataError("no usable training sample; see the report above")
    cache = ImageCache(processor, image_cache_mb) if image_cache_mb > 0 else None
    eval_ds = None
    if data.val_dataset:
        vs, verr = read_dataset(data.val_dataset, users=None, allow_pickle=data.allow_pickle)
        vkept, vlen, vrep = validate_samples(vs, processor, data.max_length, data.loss_scale, verr, desc="checking val")
        vrep.log("validation")
        eval_ds = SFTDataset(vkept, vlen, cache) if vkept else None
    elif data.split_dataset_ratio > 0:
        pairs, held = split_holdout(list(zip(kept, lengths)), data.split_dataset_ratio, seed)
        eval_ds = SFTDataset([s for s, _ in held], image_cache=cache)
        kept, lengths = [s for s, _ in pairs], [n for _, n in pairs]
    if lengths:
        logger.info("[data] %d training samples, tokens per sample: mean %.0f, max %d", len(kept),
                    sum(lengths) / len(lengths), max(lengths))
    return SFTDataset(kept, lengths, cache), eval_ds, report


# ---------------------------------------------------------------------------- model
def build_model(model_args: ModelArguments, tuner: TunerArguments, args: SFTTrainingArguments, path: str,
                model: torch.nn.Module | None = None):
    """Load the model (or take an already loaded one, e.g. `vltune personalize`'s global model) and apply the tuner."""
    if model is None:
        model = load_model(path, model_args, tuner.train_type, tuner.quant_bits, tuner.bnb_4bit_quant_type)
    model = apply_tuner(model, tuner)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model, args.gradient_checkpointing_kwargs)
    logger.info("[model] trainable parameters by part (%s, %s):\n%s", tuner.train_type,
                "gradient checkpointing on" if args.gradient_checkpointing else "no gradient checkpointing",
                format_summary(parameter_summary(model)))
    return model


def accepts_logits_to_keep(model) -> bool:
    """Whether the (PEFT-unwrapped) model's forward takes `logits_to_keep` (most transformers LMs do)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def build_collation(train_ds: SFTDataset, data: SFTDataArguments, args: SFTTrainingArguments, processor, model):
    """The training set as the Trainer will draw it (samples, or packs with --packing) and its collator
    (padded, or padding-free with --packing / --padding_free); logs the tokens per optimizer step."""
    from ..data.packing import PackedDataset, PaddingFreeCollator, find_rope_index, pad_share

    lengths = train_ds.lengths or []
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    mean = sum(lengths) / max(1, len(lengths))
    if data.packing or data.padding_free:
        # Liger's fused linear cross-entropy never materialises the logits: nothing to gain from keeping a few.
        keep = accepts_logits_to_keep(model) and not args.use_liger_kernel
        collator = PaddingFreeCollator(processor, data.loss_scale, rope_index=find_rope_index(model),
                                       keep_trained_logits=keep, train_separator=data.train_separator)
    else:
        collator = SFTCollator(processor, data.loss_scale, logits_to_keep=accepts_logits_to_keep(model),
                               train_separator=data.train_separator)
    if data.packing:
        capacity = data.packing_length or data.max_length
        train_ds = PackedDataset(train_ds, capacity, seed=args.seed)
        tokens = sum(train_ds.lengths) / len(train_ds) * per_step
        logger.info("[data] packing: %d samples in %d packs of up to %d tokens (%.0f%% full, %.1f samples a pack); "
                    "tokens per optimizer step ~%.0f (%d packs)", len(train_ds.dataset), len(train_ds), capacity,
                    100 * train_ds.fill(), len(train_ds.dataset) / len(train_ds), tokens, per_step)
    elif data.padding_free:
        logger.info("[data] padding-free batches: tokens per optimizer step ~%.0f (%d samples)", mean * per_step,
                    per_step)
    else:
        waste = pad_share(lengths, args.per_device_train_batch_size, args.seed)
        logger.info("[data] padded batches: tokens per optimizer step ~%.0f (%d samples), ~%.0f%% of the batch "
                    "is padding (--padding_free true or --packing true drops it)", mean * per_step, per_step,
                    100 * waste)
    return train_ds, collator


def check_gpu_options(model_args: ModelArguments, args: SFTTrainingArguments) -> None:
    """One line and exit status 2 when a GPU option's package is missing (instead of a traceback later)."""
    import importlib.util

    needs = []
    if args.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        needs.append("--use_liger_kernel needs the liger-kernel package (pip install liger-kernel; CUDA GPUs)")
    if (model_args.attn_impl or "").startswith("flash_attention_2") and importlib.util.find_spec("flash_attn") is None:
        needs.append("--attn_impl flash_attention_2 needs the flash-attn package (pip install flash-attn; CUDA "
                     "GPUs), or use --attn_impl sdpa (packing works with it too)")
    if needs:
        raise UsageError(f"vltune sft: {'; '.join(needs)}")


# ---------------------------------------------------------------------------- run
def run_sft(model_args: ModelArguments, tuner: TunerArguments, data: SFTDataArguments, args: SFTTrainingArguments,
            callbacks: list | None = None, model: torch.nn.Module | None = None, processor=None,
            samples: list | None = None) -> SFTResult:
    """Train and save. `model` / `processor` / `samples` let a caller that already holds them (vltune
    personalize: one loaded global model, many users) skip loading; the tuner is applied to `model` in place."""
    from transformers import Trainer

    with open_run(args.output_dir, (model_args, tuner, data, args), args.seed, args.wandb_project) as out:
        path, processor, family = load_base(model_args, processor)
        check_gpu_options(model_args, args)
        train_ds, eval_ds, report = build_datasets(data, processor, args.seed, str(out), family.coords, samples,
                                                   args.image_cache_mb)
        samples_ds = train_ds  # the SFTDataset under any packing: it counts the samples skipped at load time
        # a resumed run keeps the skips counted before it
        samples_ds.record_skips_to(out, args.process_index, fresh=not wants_resume(args.resume_from_checkpoint))
        model = build_model(model_args, tuner, args, path, model)
        train_ds, collator = build_collation(train_ds, data, args, processor, model)

        # Preflight on a real batch, on the device Trainer will use.
        if not getattr(model, "is_loaded_in_4bit", False):
            model.to(args.device)
        log_preflight(model, collator([train_ds[i] for i in range(min(args.per_device_train_batch_size, len(train_ds)))]),
                      args.device, args.bf16, args.fp16)

        if args.label_names is None:
            args.label_names = ["labels"]
        if eval_ds is not None and args.eval_strategy == "no":
            args.eval_strategy = args.save_strategy
            args.eval_steps = args.eval_steps or args.save_steps
        trainer = survivable(Trainer)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                      data_collator=WithSampleIds(collator), processing_class=processor,
                                      callbacks=[*(callbacks or []), MemoryLogCallback()])
        attach_debug_callback(trainer)  # per-rank dump when $VLTUNE_DEBUG_DIST_DIR is set (vltune/train/debug.py)
        result = train_surviving(trainer, resolve_resume(args.resume_from_checkpoint, args.output_dir), args)
        metrics = dict(result.metrics)
        if eval_ds is not None:
            metrics.update(trainer.evaluate())
        # Every rank and DataLoader worker has finished its last batch once train() returns (each step ends in
        # an all-reduce), so the skip files hold every load-time skip of the run.
        report.add_load_skips(samples_ds.load_skips())
        if samples_ds.image_cache is not None:
            logger.info("[data] image cache: %s", samples_ds.image_cache.describe())
        if report.at_load:
            report.log("train (final, with the samples skipped at load time)")
        metrics["samples_skipped"] = report.skipped

        trainer.save_model(str(out))
        if trainer.is_world_process_zero():
            processor.save_pretrained(str(out))
            trainer.save_state()
            _write_outputs(out, trainer, metrics, report, model_args, tuner, path)
        return SFTResult(str(out), metrics, report, model, processor)


def _write_outputs(out: Path, trainer, metrics: dict, report: DataReport, model_args, tuner, base: str) -> None:
    from ..eval.plots import plot_loss_curve

    (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    (out / "train_results.json").write_text(json.dumps(metrics, indent=2, default=str))
    png = plot_loss_curve(trainer.state.log_history, out / "loss.png")
    write_model_card(
        out, "vltune sft output",
        [f"base model: `{base}`", f"train type: {tuner.train_type}", f"steps: {trainer.state.global_step}",
         f"final train loss: {metrics.get('train_loss')}",
         f"samples skipped: {metrics.get('samples_skipped')} (see data_report.json)"],
        f"Load with `{load_hint(base, out, tuner.train_type)}`; the processor is saved beside.\n",
        "args.json (resolved arguments), train.log, data_report.json, train_results.json"
        f"{', loss.png' if png else ''}, runs/ (TensorBoard), checkpoint-N/",
        command="sft", library="peft" if tuner.train_type in ("lora", "qlora") else "transformers", base_model=base)
