"""vltune grpo: GRPO reinforcement learning of a vision-language model on TRL's GRPOTrainer.

    vltune grpo --model Qwen/Qwen2.5-VL-3B-Instruct --dataset grounding.jsonl --train_type lora \
        --reward_funcs click format --reward_weights 1 0.2 --format_pattern 'click\\(\\d+, \\d+\\)' \
        --num_generations 8 --max_completion_length 32 --num_iterations 200 --output_dir out/grpo
    vltune grpo --reward_funcs clip_sd3 --sd_model stabilityai/stable-diffusion-3-medium-diffusers \
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

import copy
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import GRPOConfig

from ..arg_checks import check_users_have_data
from ..config import DataArguments, ModelArguments, TunerArguments, dump_config, parse_args
from ..console import TeeLog, is_main_process, setup_logging
from ..data.dataset import DataReport, LengthEstimator
from ..data.errors import DataError
from ..data.formats import Sample, read_dataset
from ..data.images import image_size, load_image
from ..data.splits import split_holdout
from ..data.template import prompt_text
from ..errors import UsageError
from ..resume import resume_checkpoint
from ..rewards.registry import RewardContext, build_reward_funcs, completion_text, resolve_rewards

logger = logging.getLogger("vltune")


# ---------------------------------------------------------------------------- arguments
@dataclass
class RewardArguments:
    reward_funcs: list[str] = field(default_factory=lambda: ["click"], metadata={
        "help": "Rewards, by name: click (click inside the target box), iou (predicted box vs target box), "
                "accuracy (answer vs the `solution` column), format (--format_pattern regex), length "
                "(--length_target tokens), clip_sd3 (seeds/05: SD3 renders the rewrite, CLIP scores it against the "
                "original prompt), or names from --external_plugins. Weighted by --reward_weights."})
    external_plugins: list[str] = field(default_factory=list, metadata={
        "help": "Python files (or module names) defining rewards: TRL functions `f(prompts, completions, **kwargs) "
                "-> list[float]` or ms-swift classes with `__call__(self, completions, **kwargs)` (listed in an "
                "`orms` dict or found by name). Columns of the data set arrive in kwargs."})
    format_pattern: str | None = field(default=None, metadata={
        "help": "Regular expression the whole answer must match for the format reward. Default: "
                "<think>...</think><answer>...</answer>."})
    length_target: int = field(default=0, metadata={
        "help": "Target completion length in tokens for the length reward."})
    solution_column: str = field(default="solution", metadata={
        "help": "Column holding the reference answer for the accuracy reward. Without such a column the data set's "
                "final assistant turn (dropped from the prompt) is passed as `solution`."})
    original_prompt_column: str = field(default="original_prompt", metadata={
        "help": "clip_sd3: column with the prompt CLIP compares the image against (default: the last user turn)."})
    sd_model: str | None = field(default=None, metadata={
        "help": "clip_sd3: Stable Diffusion 3 pipeline, hub id or local directory (diffusers). Default: an embedded "
                "tiny SD3 with random weights (runs offline; scores mean nothing)."})
    clip_model: str | None = field(default=None, metadata={
        "help": "clip_sd3: CLIP model, hub id or local directory. Default: an embedded tiny random CLIP."})
    sd_steps: int = field(default=28, metadata={
        "help": "clip_sd3: SD3 denoising steps per image (fewer = faster rewards, rougher images)."})
    sd_image_size: int = field(default=512, metadata={"help": "clip_sd3: rendered image size in pixels (square)."})
    sd_guidance_scale: float = field(default=7.0, metadata={"help": "clip_sd3: classifier-free guidance scale."})
    sd_batch_size: int = field(default=8, metadata={
        "help": "clip_sd3: rewrites rendered per SD3 call (higher = faster, more memory)."})
    sd_torch_dtype: str = field(default="auto", metadata={
        "help": "clip_sd3: dtype of the SD3 pipeline (auto = bf16/fp16 on GPU, fp32 on CPU)."})
    save_reward_images_steps: int = field(default=0, metadata={
        "help": "clip_sd3: save the rendered images of every N-th step to <output_dir>/reward_images (0 = never)."})
    heldout_eval: bool = field(default=True, metadata={
        "help": "Measure the mean reward on held-out prompts (--val_dataset, or --split_dataset_ratio) before and "
                "after training; reported in final_results.json."})
    heldout_max_samples: int = field(default=64, metadata={"help": "Held-out prompts used for that measurement."})
    heldout_generations: int = field(default=4, metadata={
        "help": "Answers sampled per held-out prompt at the training --temperature: the held-out figure is the "
                "expected reward of the policy GRPO optimises. 0 = one greedy answer per prompt instead."})


def _default_output_dir() -> str:
    return "output/grpo"


@dataclass
class GRPOTrainingArguments(GRPOConfig):
    """TRL's GRPOConfig (every TRL/HF name works) with vltune's defaults and the seeds' `num_iterations`."""

    output_dir: str | None = field(default_factory=_default_output_dir, metadata={"help": "Where to write everything."})
    learning_rate: float = field(default=1e-5, metadata={
        "help": "Peak learning rate (1e-5 suits LoRA GRPO; ~1e-6 full)."})
    num_iterations: int | None = field(default=None, metadata={
        "help": "seeds/05 meaning: the number of training iterations (optimizer steps), i.e. --max_steps. NOTE: in TRL "
                "and ms-swift `num_iterations` means updates per generated batch (mu in the GRPO paper); that is "
                "--updates_per_batch here."})
    updates_per_batch: int = field(default=1, metadata={
        "help": "Optimisation passes over each generated batch (TRL's / ms-swift's num_iterations, mu). >1 reuses "
                "completions (cheaper per step) and makes the clipping by --epsilon matter."})
    beta: float = field(default=0.04, metadata={
        "help": "KL coefficient against the reference model (ms-swift's default 0.04). 0 skips the reference "
                "model (less memory, faster) but then no KL is logged."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps (1 = per-step reward/KL curves)."})
    save_steps: float = field(default=50, metadata={
        "help": "Save a checkpoint-N (with training_stats.json) every N steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most this many checkpoints."})
    report_to: list[str] | None = field(default_factory=lambda: ["tensorboard"], metadata={
        "help": "tensorboard | wandb | none (several allowed). Seeds' --use_wandb = --report_to wandb."})
    wandb_project: str | None = field(default=None, metadata={"help": "W&B project (sets WANDB_PROJECT)."})
    wandb_run_name: str | None = field(default=None, metadata={"help": "W&B run name (= --run_name)."})

    def __post_init__(self):
        if self.num_iterations is not None:
            if self.max_steps not in (-1, None) and self.max_steps != self.num_iterations:
                raise ValueError(f"--num_iterations {self.num_iterations} (training iterations, the seeds' meaning) "
                                 f"and --max_steps {self.max_steps} disagree; give one of them")
            self.max_steps = int(self.num_iterations)
        if self.wandb_run_name and not self.run_name:
            self.run_name = self.wandb_run_name
        super().__post_init__()

    def for_trl(self) -> "GRPOTrainingArguments":
        """A copy whose `num_iterations` carries TRL's meaning (mu), as GRPOTrainer reads it."""
        trl_args = copy.copy(self)
        trl_args.num_iterations = self.updates_per_batch
        return trl_args


# GRPOConfig has its own `trust_remote_code`; one flag fills both (the model group's copy is set from it in main).
_GRPOModelArguments = make_dataclass(
    "ModelArguments", [(f.name, f.type, f) for f in fields(ModelArguments) if f.name != "trust_remote_code"])
ARG_GROUPS = (_GRPOModelArguments, TunerArguments, DataArguments, RewardArguments, GRPOTrainingArguments)


@dataclass
class GRPOResult:
    output_dir: str
    metrics: dict
    final_results: dict
    model: torch.nn.Module
    processor: object


# ---------------------------------------------------------------------------- prompts
@dataclass
class PromptRow:
    sample: Sample  # the conversation without its final assistant turn (for generation outside TRL)
    prompt: list[dict]  # TRL conversational prompt: [{"role", "content": [{"type": "image"} | {"type": "text"}]}]
    columns: dict  # every other column of the data set (+ `solution` from the dropped final turn)


def prompt_rows(samples: list[Sample], processor, max_length: int | None, read_errors=None,
                solution_column: str = "solution") -> tuple[list[PromptRow], DataReport]:
    """Drop each conversation's final assistant turn, check the rest, keep the other columns."""
    report = DataReport(total=len(samples) + len(read_errors or []))
    for err in read_errors or []:
        report.add(err)
    estimator = LengthEstimator(processor)
    rows = []
    for s in samples:
        try:
            messages = list(s.messages)
            answer = None
            if messages and messages[-1]["role"] == "assistant":
                answer = "".join(p.get("text", "") for p in messages[-1]["content"] if p["type"] == "text")
                messages = messages[:-1]
            if not any(m["role"] == "user" for m in messages):
                raise DataError("no user turn to prompt with", s.where, "no prompt")
            prompt_only = Sample(messages=messages, images=s.images, where=s.where, extra=s.extra)
            if prompt_only.num_image_parts != len(s.images):
                raise DataError(f"{prompt_only.num_image_parts} <image> tag(s) in the prompt but {len(s.images)} "
                                f"image(s)", s.where, "image/tag mismatch")
            sizes = [image_size(ref) for ref in s.images]
            if max_length:
                n = estimator.length(prompt_text(prompt_only, processor), sizes)
                if n > max_length:
                    raise DataError(f"prompt of {n} tokens > max_length {max_length} (dropped, never truncated)",
                                    s.where, "too long")
        except DataError as e:
            report.add(e if e.where else e.at(s.where))
            continue
        columns = dict(s.extra)
        if answer is not None and solution_column not in columns:
            columns[solution_column] = answer
        prompt = [{"role": m["role"], "content": [dict(p) for p in m["content"]]} for m in messages]
        rows.append(PromptRow(prompt_only, prompt, columns))
    report.kept = len(rows)
    return rows, report


def rows_to_dataset(rows: list[PromptRow]):
    """A datasets.Dataset that TRL can sample from; images are decoded (PIL) only when a batch is drawn."""
    import datasets

    columns = sorted({k for r in rows for k in r.columns} - {"prompt", "images", "image"})
    has_images = any(r.sample.images for r in rows)

    def decode(batch: dict) -> dict:
        chosen = [rows[i] for i in batch["__row"]]
        out = {"prompt": [r.prompt for r in chosen]}
        if has_images:
            out["images"] = [[load_image(ref) for ref in r.sample.images] for r in chosen]
        for c in columns:
            out[c] = [r.columns.get(c) for r in chosen]
        return out

    return datasets.Dataset.from_dict({"__row": list(range(len(rows)))}).with_transform(decode)


def build_prompts(data: DataArguments, reward: RewardArguments, processor, seed: int, output_dir: str, convention: str):
    """Read the data, make prompt rows; return (train rows, held-out rows or [], report)."""
    specs = list(data.dataset)
    val_specs = list(data.val_dataset)
    if not specs:
        from ..data.synthetic import make_grounding_set

        check_users_have_data(data.users)

        made = make_grounding_set(Path(output_dir) / "demo_data", n_train=256, n_test=32, seed=seed,
                                  convention=convention, processor=processor)
        specs = [made["train"]]
        val_specs = val_specs or [made["test"]]
        logger.info("[data] no --dataset given: using the demo's synthetic grounding set (%s)", made["train"])
    samples, errors = read_dataset(specs, users=data.users, allow_pickle=data.allow_pickle)
    if data.num_samples:
        samples = samples[: data.num_samples]
    rows, report = prompt_rows(samples, processor, data.max_length, errors, reward.solution_column)
    report.log("train prompts")
    if report.skipped and data.strict:
        raise report.strict_error("prompt")
    if not rows:
        raise DataError("no usable training prompt; see the report above")
    heldout: list[PromptRow] = []
    if val_specs:
        vs, verr = read_dataset(val_specs, users=None, allow_pickle=data.allow_pickle)
        heldout, vrep = prompt_rows(vs, processor, data.max_length, verr, reward.solution_column)
        vrep.log("held-out prompts")
    elif data.split_dataset_ratio > 0:
        rows, heldout = split_holdout(rows, data.split_dataset_ratio, seed)
    logger.info("[data] %d training prompts, %d held-out prompts", len(rows), len(heldout))
    return rows, heldout, report


# ---------------------------------------------------------------------------- held-out reward
def heldout_reward(model, processor, rows: list[PromptRow], reward_funcs: list, weights: list[float] | None,
                   max_new_tokens: int, generations: int = 4, temperature: float = 1.0, seed: int = 0,
                   desc: str = "held-out") -> dict:
    """Mean weighted reward on held-out prompts (None = reward n/a, as in TRL's nansum): of `generations` answers
    sampled per prompt at `temperature` (seeded, so before/after see the same random stream), or of one greedy
    answer per prompt when generations == 0."""
    from ..eval.grounding import generate_answers

    gen = {}
    if generations > 0:
        rows = [r for r in rows for _ in range(generations)]
        gen = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
    with _seeded(seed):
        answers = generate_answers(model, processor, [r.sample for r in rows], max_new_tokens=max_new_tokens,
                                   desc=desc, **gen)
    tok = processor.tokenizer
    weights = list(weights) if weights else [1.0] * len(reward_funcs)
    columns = sorted({k for r in rows for k in r.columns})
    kwargs = {c: [r.columns.get(c) for r in rows] for c in columns}
    if any(r.sample.images for r in rows):
        kwargs["images"] = [[load_image(ref) for ref in r.sample.images] for r in rows]
    kwargs.update(trainer_state=None, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    per_func, total = {}, [0.0] * len(rows)
    for fn, w in zip(reward_funcs, weights):
        values = fn(prompts=[r.prompt for r in rows], completions=completions, completion_ids=ids, **kwargs)
        valid = [v for v in values if v is not None]
        per_func[fn.__name__] = sum(valid) / len(valid) if valid else None
        total = [t + w * (v or 0.0) for t, v in zip(total, values)]
    return {"n": len(rows), "sampled": generations > 0, "mean_reward": sum(total) / max(len(total), 1),
            "rewards": per_func,
            "examples": [{"prompt": completion_text(r.prompt[-1:])[-120:], "answer": a}
                         for r, a in list(zip(rows, answers))[:8]]}


class _seeded:
    """Fork torch's RNG for a block: a fixed seed inside, the caller's RNG state restored after."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.fork = torch.random.fork_rng()
        self.fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


# ---------------------------------------------------------------------------- logs and checkpoints
class GRPORunLog(TrainerCallback):
    """Per-step GRPO figures (reward, KL, share of tied groups, step time) -> train.log, training_stats.json in
    every checkpoint-N/, and completions.jsonl (with each completion's rewards) when --log_completions is on."""

    KEYS = ("loss", "grad_norm", "learning_rate", "reward", "reward_std", "kl", "frac_reward_zero_std",
            "completions/mean_length", "entropy")

    def __init__(self, output_dir: str, reward_names: list[str], weights: list[float], groups_per_step: int,
                 log_completions: bool):
        self.out = Path(output_dir)
        self.reward_names = reward_names
        self.weights = weights
        self.groups_per_step = groups_per_step
        self.log_completions = log_completions
        self.history: list[dict] = []
        self.trainer = None
        self._last_batch = None
        self._t_step = None
        self._step_seconds: list[float] = []
        self._warned_ties = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t_step = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t_step is not None:
            self._step_seconds.append(time.perf_counter() - self._t_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs:
            return
        row = {"step": state.global_step, **{k: logs[k] for k in self.KEYS if k in logs},
               **{k: v for k, v in logs.items() if k.startswith("rewards/")}}
        tied = logs.get("frac_reward_zero_std")
        if tied is not None:
            row["groups_all_tied"] = round(tied * self.groups_per_step, 3)
            row["groups_per_step"] = self.groups_per_step
        if self._step_seconds:
            row["step_seconds"] = round(self._step_seconds[-1], 4)
        self.history.append(row)
        if is_main_process():
            logger.info("[grpo] step %d: reward %.3f (std %.3f)%s, tied groups %s/%d, loss %.4g, grad_norm %.3g",
                        state.global_step, logs["reward"], logs.get("reward_std", float("nan")),
                        f", kl {logs['kl']:.4g}" if "kl" in logs else "",
                        "?" if tied is None else f"{tied * self.groups_per_step:g}", self.groups_per_step,
                        logs.get("loss", float("nan")), logs.get("grad_norm", float("nan")))
            if tied is not None and tied >= 1.0 and self._warned_ties < 3:
                self._warned_ties += 1
                logger.warning(
                    "[grpo] step %d: in every group all %d completions got the same reward, so every advantage is 0 "
                    "and loss/grad_norm are 0 (only the KL term acts): the model did not learn from this step. Not a "
                    "bug; if it persists, raise --temperature or --num_generations, or use a reward with finer grades. If a "
                    "reward of yours gives one value to everything, see its warning above: check what it receives.",
                    state.global_step, args.num_generations)
            if self.log_completions:
                self._write_completions(state.global_step)

    def _write_completions(self, step: int) -> None:
        logs = getattr(self.trainer, "_logs", None)
        if not logs or not logs.get("completion"):
            return
        completions = [completion_text(c) for c in logs["completion"]]
        prompts = [completion_text(p[-1:]) if isinstance(p, list) else str(p) for p in logs["prompt"]]
        signature = (tuple(prompts), tuple(completions))
        if signature == self._last_batch:  # the same generation, logged again (updates_per_batch > 1)
            return
        self._last_batch = signature
        rewards = {name: list(logs["rewards"].get(name, [])) for name in self.reward_names}
        advantages = list(logs.get("advantages", []))
        with open(self.out / "completions.jsonl", "a", encoding="utf-8") as f:
            for i, (p, c) in enumerate(zip(prompts, completions)):
                per = {n: (None if i >= len(v) or (isinstance(v[i], float) and math.isnan(v[i])) else v[i])
                       for n, v in rewards.items()}
                total = sum(w * (per[n] or 0.0) for n, w in zip(self.reward_names, self.weights))
                f.write(json.dumps({"step": step, "prompt": p, "completion": c, "rewards": per, "reward": total,
                                    "advantage": advantages[i] if i < len(advantages) else None}) + "\n")

    def stats(self) -> dict:
        return {"reward_funcs": self.reward_names, "reward_weights": self.weights, "history": self.history}

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if is_main_process() and folder.is_dir():
            (folder / "training_stats.json").write_text(json.dumps(
                {"global_step": state.global_step, **self.stats()}, indent=2, default=str))


# ---------------------------------------------------------------------------- recipe
def run_grpo(model_args: ModelArguments, tuner: TunerArguments, data: DataArguments, reward: RewardArguments,
             args: GRPOTrainingArguments, callbacks: list | None = None) -> GRPOResult:
    from transformers import AutoConfig, set_seed
    from trl import GRPOTrainer

    from ..data.dataset import SFTCollator
    from ..models.families import family_for_model_type
    from ..models.load import load_processor, resolve_model_path
    from ..models.preflight import check_gradient_flow
    from .sft import build_model

    setup_logging()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with TeeLog(out / "train.log"):
        if args.wandb_project:
            os.environ["WANDB_PROJECT"] = args.wandb_project
        set_seed(args.seed)
        if is_main_process():
            dump_config((model_args, tuner, data, reward, args), out / "args.json")
        resolved = resolve_rewards(reward.reward_funcs, reward.external_plugins)  # before any weight is loaded
        weights = list(args.reward_weights) if args.reward_weights else [1.0] * len(resolved)
        if len(weights) != len(resolved):
            raise UsageError(f"--reward_weights has {len(weights)} values for {len(resolved)} --reward_funcs "
                             f"({', '.join(reward.reward_funcs)}); give one weight per reward")
        path = resolve_model_path(model_args)
        processor = load_processor(path, model_args.max_pixels, model_args.min_pixels, model_args.trust_remote_code)
        family = family_for_model_type(AutoConfig.from_pretrained(path).model_type)
        logger.info("[model] %s (family %s, coordinates %s)", path, family.name, family.coords)

        rows, heldout, report = build_prompts(data, reward, processor, args.seed, str(out), family.coords)
        train_ds = rows_to_dataset(rows)
        ctx = RewardContext(args=reward, processor=processor, coords=family.coords, output_dir=str(out),
                            extra={"device": str(args.device), "seed": args.seed})
        reward_funcs = build_reward_funcs(reward.reward_funcs, ctx, resolved=resolved)
        model = build_model(model_args, tuner, args, path)

        # Preflight on one prompt + its reference answer (or a stand-in): gradients must reach every trained part.
        if not getattr(model, "is_loaded_in_4bit", False):
            model.to(args.device)
        first = rows[0]
        answer = str(first.columns.get(reward.solution_column) or "ok")
        reply = {"role": "assistant", "content": [{"type": "text", "text": answer}], "loss": None}
        probe = Sample(messages=first.sample.messages + [reply], images=first.sample.images)
        batch = SFTCollator(processor)([{"sample": probe, "images": [load_image(r) for r in probe.images]}])
        batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        amp = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        norms = check_gradient_flow(model, batch, autocast_dtype=amp)
        logger.info("[preflight] gradients reach every trainable group: %s",
                    ", ".join(f"{g} |g|={v:.3g}" for g, v in norms.items()))

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
        trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args.for_trl(), train_dataset=train_ds,
                              processing_class=processor, callbacks=[run_log, *(callbacks or [])])
        run_log.trainer = trainer
        logger.info("[grpo] %d prompts x %d generations per step (= %d groups), %s steps, updates per batch %d, "
                    "beta %g, loss %s", groups, args.num_generations, groups, args.max_steps if args.max_steps > 0
                    else "epoch-based", args.updates_per_batch, args.beta, args.loss_type)
        t0 = time.time()
        result = trainer.train(resume_from_checkpoint=resume_checkpoint(args.resume_from_checkpoint, str(out)))
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
    load_hint = (f"PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained('{base}'), '{out}')"
                 if tuner.train_type in ("lora", "qlora") else f"AutoModelForImageTextToText.from_pretrained('{out}')")
    (out / "README.md").write_text(
        f"# vltune grpo output\n\n- base model: `{base}`\n- train type: {tuner.train_type}\n"
        f"- steps: {trainer.state.global_step}\n- rewards: {', '.join(run_log.reward_names)}\n"
        f"- held-out mean reward: {before and before['mean_reward']} before -> "
        f"{after and after['mean_reward']} after\n\n"
        f"Load with `{load_hint}`; the processor is saved beside.\n"
        f"Files: args.json, train.log, final_results.json, training_stats.json (per-step reward, KL, tied groups), "
        f"{', '.join(Path(p).name for p in pngs)}, completions.jsonl (with --log_completions), runs/ (TensorBoard), "
        f"checkpoint-N/ (each with training_stats.json).\n")
    logger.info("[done] saved to %s", out)
    return final


def main(argv: list[str] | None = None) -> GRPOResult:
    model_args, tuner, data, reward, args = parse_args(ARG_GROUPS, argv, prog="vltune grpo", description=__doc__)
    model_args = ModelArguments(**asdict(model_args), trust_remote_code=args.trust_remote_code)
    return run_grpo(model_args, tuner, data, reward, args)


def grpo(config: str | None = None, **kwargs) -> GRPOResult:
    """Python API: the CLI's argument names as keywords (seeds' spellings included), optionally on top of a
    config file, e.g. `grpo(train_type="lora", lora_rank=8, num_iterations=20, reward_funcs=["click"])`."""
    merged = {}
    if config:
        from ..config import load_config_file

        merged.update(load_config_file(config))
    merged.update(kwargs)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(merged, f)
    try:
        return main(["--config", f.name])
    finally:
        os.unlink(f.name)
