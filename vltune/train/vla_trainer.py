"""The VLA trainer: HF Trainer saving in the policy format, with the Lightning-era behaviour RoboVLMs users
rely on (best-k checkpoints on validation loss, a CSV log, a wall-time budget)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback

from ..checkpoints import list_checkpoints, unmark
from .survive import SurvivingTrainer

logger = logging.getLogger("vltune")


class TopKCheckpoints(TrainerCallback):
    """Keep the k checkpoints with the lowest eval_loss (the k most recent without validation)."""

    def __init__(self, output_dir: str, k: int):
        self.dir, self.k, self.losses = Path(output_dir), k, {}

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if metrics and "eval_loss" in metrics:
            self.losses[state.global_step] = float(metrics["eval_loss"])

    def on_save(self, args, state, control, **kw):
        if not state.is_world_process_zero or self.k <= 0:
            return
        # Only complete checkpoints compete (SurvivingTrainer removes incomplete leftovers and marks new ones).
        ckpts = {c.step: Path(c.path) for c in list_checkpoints(self.dir) if c.complete}
        rank = sorted(ckpts, key=lambda s: (self.losses.get(s, float("inf")), -s)) if self.losses else \
            sorted(ckpts, reverse=True)
        for step in rank[self.k:]:
            unmark(str(ckpts[step]))
            shutil.rmtree(ckpts[step], ignore_errors=True)
        kept = [{"step": s, "eval_loss": self.losses.get(s), "path": str(ckpts[s])} for s in rank[: self.k]]
        (self.dir / "best_checkpoints.json").write_text(json.dumps(kept, indent=1))


class CSVLog(TrainerCallback):
    """metrics.csv: one row per logged value (step, epoch, name, value), like Lightning's CSVLogger."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "epoch", "name", "value"])
            for k, v in logs.items():
                if isinstance(v, (int, float)):
                    w.writerow([state.global_step, round(state.epoch or 0, 4), k, v])


class TimeBudget(TrainerCallback):
    """Stop (with a final save) once `seconds` of training wall time have passed."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, None

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kw):
        if time.time() - self.start > self.seconds:
            logger.info("[train] --train_seconds %.0f reached at step %d: stopping", self.seconds, state.global_step)
            control.should_training_stop = True
            control.should_save = True


class PolicyTrainer(SurvivingTrainer, Trainer):
    """Trainer that saves checkpoints in the policy format (loadable with Policy.from_pretrained)."""

    normalizers: dict | None = None

    def _save(self, output_dir=None, state_dict=None):
        self.model.save_pretrained(output_dir or self.args.output_dir, self.normalizers)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """A checkpoint holds policy.safetensors (what the policy format saves: the whole model for full
        fine-tuning, else adapter + head), which the HF loader does not know; the optimizer, scheduler, RNG and
        data position are then restored by the Trainer as usual."""
        from safetensors.torch import load_file

        from ..vla.modeling import WEIGHTS_NAME

        model = model or self.model
        path = Path(resume_from_checkpoint) / WEIGHTS_NAME
        if not path.is_file():
            raise ValueError(f"{resume_from_checkpoint}: no {WEIGHTS_NAME}; not a checkpoint of vltune vla")
        state = load_file(str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        lost = [k for k in missing if k in set(model.weights_to_save())]
        if unexpected or lost:
            raise ValueError(f"{path}: does not fit this policy ({len(unexpected)} unexpected, {len(lost)} missing "
                             f"tensors, e.g. {(unexpected or lost)[0]}); resume with the arguments of the run that "
                             f"saved it")


def eval_loader(trainer, eval_ds, collator):
    from torch.utils.data import DataLoader

    def get(eval_dataset=None):
        return DataLoader(eval_ds, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=collator)

    return get
