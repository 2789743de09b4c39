"""GRPO's run log: per-step reward, KL, tied groups and step time into train.log, training_stats.json and
completions.jsonl."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from ..console import is_main_process
from ..rewards.registry import completion_text

logger = logging.getLogger("vltune")


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
