"""vltune grpo: GRPO reinforcement learning of a vision-language model on TRL's GRPOTrainer.

    vltune grpo --model Qwen/Qwen2.5-VL-3B-Instruct --dataset grounding.jsonl --train_type lora \\
        --reward_funcs click format --reward_weights 1 0.2 --format_pattern 'click\\(\\d+, \\d+\\)' \\
        --num_generations 8 --max_completion_length 32 --num_iterations 200 --output_dir out/grpo
    vltune grpo --reward_funcs clip_sd3 --sd_model stabilityai/stable-diffusion-3-medium-diffusers \\
        --clip_model openai/clip-vit-large-patch14 --dataset prompts.jsonl ...     # seeds/05
    vltune grpo --reward_funcs my_reward --external_plugins my_rewards.py ...     # your own reward
    vltune grpo --num_iterations 5 --max_completion_length 16     # offline: tiny model + demo data + click

    from vltune.recipes.grpo import grpo          # the Python API takes the same names
    result = grpo(train_type="lora", reward_funcs=["click"], num_iterations=20, output_dir="out/grpo")

Top to bottom: arguments -> processor -> prompts (the SFT data formats with the final assistant turn
dropped; every other column reaches the rewards) -> model + tuner (as `vltune sft`) -> rewards
(registry, plug-ins) -> held-out reward before -> TRL GRPOTrainer -> held-out reward after ->
adapter/weights, processor, training_stats.json per checkpoint, final_results.json, completions.jsonl,
reward.png / kl.png.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..args import DataArguments, ModelArguments, TunerArguments, parse_args
from ..data.dataset import DataReport
from ..data.formats import Sample
from ..data.images import load_image
from ..rewards.registry import RewardContext, build_reward_funcs
from ..train.grpo_callbacks import GRPORunLog
from ..train.grpo_config import ARG_GROUPS, GRPOTrainingArguments, RewardArguments
from ..train.grpo_heldout import heldout_reward
from ..train.grpo_prompts import build_prompts, rows_to_dataset
from ..errors import UsageError
from ..rewards.registry import resolve_rewards
from ..train.survive import survivable, train as train_surviving
from ..train.run import load_base, load_hint, log_preflight, open_run, resolve_resume, write_model_card

logger = logging.getLogger("vltune")


@dataclass
class GRPOResult:
    output_dir: str
    metrics: dict
    final_results: dict
    model: torch.nn.Module
    processor: object


# ---------------------------------------------------------------------------- recipe
def run_grpo(model_args: ModelArguments, tuner: TunerArguments, data: DataArguments, reward: RewardArguments,
             args: GRPOTrainingArguments, callbacks: list | None = None) -> GRPOResult:
    from trl import GRPOTrainer

    from ..data.dataset import SFTCollator
    from ..train.sft import build_model

    with open_run(args.output_dir, (model_args, tuner, data, reward, args), args.seed, args.wandb_project) as out:
        resolved = resolve_rewards(reward.reward_funcs, reward.external_plugins)  # before any weight is loaded
        if args.reward_weights and len(args.reward_weights) != len(resolved):
            raise UsageError(f"--reward_weights has {len(args.reward_weights)} values for {len(resolved)} "
                             f"--reward_funcs ({', '.join(reward.reward_funcs)}); give one weight per reward")
        path, processor, family = load_base(model_args)
        rows, heldout, report = build_prompts(data, reward, processor, args.seed, str(out), family.coords)
        train_ds = rows_to_dataset(rows)
        ctx = RewardContext(args=reward, processor=processor, coords=family.coords, output_dir=str(out),
                            extra={"device": str(args.device), "seed": args.seed})
        reward_funcs = build_reward_funcs(reward.reward_funcs, ctx, resolved=resolved)
        weights = list(args.reward_weights) if args.reward_weights else [1.0] * len(reward_funcs)
        if len(weights) != len(reward_funcs):
            raise ValueError(f"--reward_weights has {len(weights)} values for {len(reward_funcs)} --reward_funcs "
                             f"({', '.join(reward.reward_funcs)}); give one weight per reward")
        model = build_model(model_args, tuner, args, path)

        # Preflight on one prompt + its reference answer (or a stand-in): gradients must reach every trained part.
        if not getattr(model, "is_loaded_in_4bit", False):
            model.to(args.device)
        first = rows[0]
        answer = str(first.columns.get(reward.solution_column) or "ok")
        reply = {"role": "assistant", "content": [{"type": "text", "text": answer}], "loss": None}
        probe = Sample(messages=first.sample.messages + [reply], images=first.sample.images)
        batch = SFTCollator(processor)([{"sample": probe, "images": [load_image(r) for r in probe.images]}])
        log_preflight(model, batch, args.device, args.bf16, args.fp16)

        heldout = heldout[: reward.heldout_max_samples] if reward.heldout_eval else []
        heldout_kw = dict(max_new_tokens=args.max_completion_length, generations=reward.heldout_generations,
                          temperature=args.temperature, seed=args.seed)
        before = heldout_reward(model, processor, heldout, reward_funcs, weights, desc="held-out before",
                                **heldout_kw) if heldout else None
        if before:
            logger.info("[eval] held-out mean reward before training: %.3f over %d answers %s", before["mean_reward"],
                        before["n"], before["rewards"])

        groups = args.generation_batch_size // args.num_generations
        run_log = GRPORunLog(str(out), list(reward.reward_funcs), weights, groups, args.log_completions)
        trainer = survivable(GRPOTrainer)(model=model, reward_funcs=reward_funcs, args=args.for_trl(), train_dataset=train_ds,
                              processing_class=processor, callbacks=[run_log, *(callbacks or [])])
        run_log.trainer = trainer
        logger.info("[grpo] %d prompts x %d generations per step (= %d groups), %s steps, updates per batch %d, "
                    "beta %g, loss %s", groups, args.num_generations, groups, args.max_steps if args.max_steps > 0
                    else "epoch-based", args.updates_per_batch, args.beta, args.loss_type)
        t0 = time.time()
        result = train_surviving(trainer, resolve_resume(args.resume_from_checkpoint, args.output_dir), args)
        train_seconds = time.time() - t0
        metrics = dict(result.metrics)

        after = heldout_reward(trainer.model, processor, heldout, reward_funcs, weights, desc="held-out after",
                               **heldout_kw) if heldout else None
        if after:
            logger.info("[eval] held-out mean reward after training: %.3f (before %.3f) over %d answers %s",
                        after["mean_reward"], before["mean_reward"], after["n"], after["rewards"])

        trainer.save_model(str(out))
        final = {}
        if trainer.is_world_process_zero():
            processor.save_pretrained(str(out))
            trainer.save_state()
            final = _write_outputs(out, trainer, run_log, metrics, report, before, after, train_seconds, tuner, path)
        return GRPOResult(str(out), metrics, final, trainer.model, processor)


def _write_outputs(out: Path, trainer, run_log: GRPORunLog, metrics: dict, report: DataReport, before, after,
                   train_seconds: float, tuner, base: str) -> dict:
    from ..eval.plots import plot_grpo_curves

    history = run_log.history
    step_seconds = [h["step_seconds"] for h in history if "step_seconds" in h]
    tied = [h["frac_reward_zero_std"] for h in history if "frac_reward_zero_std" in h]
    final = {
        "global_step": trainer.state.global_step,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(sum(step_seconds) / len(step_seconds), 4) if step_seconds else None,
        "reward_first_step": history[0]["reward"] if history else None,
        "reward_last_step": history[-1]["reward"] if history else None,
        "mean_frac_groups_all_tied": sum(tied) / len(tied) if tied else None,
        "heldout_before": before,
        "heldout_after": after,
        "prompts_skipped": report.skipped,
        "train_metrics": metrics,
    }
    (out / "final_results.json").write_text(json.dumps(final, indent=2, default=str))
    (out / "training_stats.json").write_text(json.dumps(
        {"global_step": trainer.state.global_step, **run_log.stats()}, indent=2, default=str))
    pngs = plot_grpo_curves(history, out)
    write_model_card(
        out, "vltune grpo output",
        [f"base model: `{base}`", f"train type: {tuner.train_type}", f"steps: {trainer.state.global_step}",
         f"rewards: {', '.join(run_log.reward_names)}",
         f"held-out mean reward: {before and before['mean_reward']} before -> {after and after['mean_reward']} after"],
        f"Load with `{load_hint(base, out, tuner.train_type)}`; the processor is saved beside.\n",
        f"args.json, train.log, final_results.json, training_stats.json (per-step reward, KL, tied groups), "
        f"{', '.join(Path(p).name for p in pngs)}, completions.jsonl (with --log_completions), runs/ (TensorBoard), "
        f"checkpoint-N/ (each with training_stats.json)",
        command="grpo", library="peft" if tuner.train_type in ("lora", "qlora") else "transformers", base_model=base)
    return final


def main(argv: list[str] | None = None, values: dict | None = None) -> GRPOResult:
    """`values`: argument names -> values on top of --config and below the command line (the Python API)."""
    model_args, tuner, data, reward, args = parse_args(ARG_GROUPS, argv, prog="vltune grpo", description=__doc__,
                                                       values=values)
    model_args = ModelArguments(**asdict(model_args), trust_remote_code=args.trust_remote_code)
    return run_grpo(model_args, tuner, data, reward, args)


def grpo(config: str | None = None, **kwargs) -> GRPOResult:
    """Python API: the CLI's argument names as keywords (seeds' spellings included), optionally on top of a
    config file, e.g. `grpo(train_type="lora", lora_rank=8, num_iterations=20, reward_funcs=["click"])`."""
    return main(["--config", config] if config else [], values=kwargs)
