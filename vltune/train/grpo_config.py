"""GRPO's argument groups: rewards (RewardArguments) and TRL's GRPOConfig with vltune's defaults
(GRPOTrainingArguments); `ARG_GROUPS` is what `vltune grpo` and `vltune.recipes.grpo.grpo()` parse."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from trl import GRPOConfig

from ..args import DataArguments, RunSafetyArguments, default_output_dir
from ..models.config import BaseModelArguments, TunerArguments


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


@dataclass
class GRPOTrainingArguments(RunSafetyArguments, GRPOConfig):
    """TRL's GRPOConfig (every TRL/HF name works) with vltune's defaults and the seeds' `num_iterations`."""

    output_dir: str | None = field(default_factory=default_output_dir("grpo"), metadata={"help": "Where to write everything."})
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


# GRPOConfig has its own `trust_remote_code`; one flag fills both (the recipe builds ModelArguments from it).
ARG_GROUPS = (BaseModelArguments, TunerArguments, DataArguments, RewardArguments, GRPOTrainingArguments)
