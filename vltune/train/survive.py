"""What lets a training run survive: complete checkpoints only, a full disk, preemption, non-finite losses.

`SurvivingTrainer` is mixed in front of the HF Trainer class each command trains with (`survivable(Trainer)`
for sft, `survivable(GRPOTrainer)` for grpo, PolicyTrainer for vla):

- every checkpoint is marked complete (vltune.checkpoints) only once all of it is on disk, and old ones are
  rotated by --save_total_limit counting complete checkpoints only, after the new one is complete: the last
  complete checkpoint is never deleted before its successor is whole;
- a save that fails removes the partial checkpoint; a full disk stops the run with `RunStopped` (status 74)
  naming the disk and the intact checkpoint to resume from;
- `Preemption` (a context manager + callback) turns SIGTERM or a first Ctrl-C into "save at the end of this
  step, then stop" (status 75 / 130); a second Ctrl-C stops at once;
- a NaN/inf loss or gradient norm stops the run (status 65) naming the step and its samples, or, with
  --nonfinite skip, leaves the weights untouched for that step and counts it.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import signal
import threading
import time

import torch
from transformers import TrainerCallback

from ..checkpoints import is_complete, list_checkpoints, mark_complete, newest_complete, unmark
from ..errors import RunStopped

logger = logging.getLogger("vltune")

SAMPLE_IDS = "sample_ids"  # batch key: where each sample of the batch comes from (popped before the forward)


def any_rank(flag: bool, device) -> bool:
    """True on every process when `flag` is true on any (a collective: every process must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_lists(items: list, enabled: bool = True) -> list:
    """Every process's `items`, concatenated in rank order (a collective under torchrun)."""
    import torch.distributed as dist

    if not (enabled and dist.is_available() and dist.is_initialized()):
        return list(items)
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def is_disk_full(error: BaseException, folder: str) -> bool:
    """Whether a failed save ran out of disk. torch.save's zip writer reports ENOSPC as a bare RuntimeError, so
    the free space is asked as well."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(e) for s in ("No space left on device", "os error 28", "StorageFull", "Disk quota")):
            return True
        e = e.__cause__ or e.__context__
    try:
        usage = shutil.disk_usage(folder if os.path.isdir(folder) else os.path.dirname(folder) or ".")
    except OSError:
        return False
    return usage.free < min(256 << 20, usage.total // 100)


def _free(path: str) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.2f} GiB free"
    except OSError:
        return "free space unknown"


class SurvivingTrainer:
    """Mixin for a transformers Trainer (put it first in the bases). See the module docstring."""

    nonfinite: str = "stop"  # stop | skip (set by the recipe from --nonfinite)
    max_nonfinite_steps: int = 0
    nonfinite_steps: int = 0
    _step_ids: dict | None = None  # this optimizer step's sample ids, in order (a dict: ordered, O(1) dedup)
    _step_losses: list | None = None  # its micro-batches' losses, still on the device

    # ------------------------------------------------------------------ non-finite losses
    def training_step(self, model, inputs, *args, **kwargs):
        if self._step_ids is None:
            self._step_ids, self._step_losses = {}, []
        self._step_ids.update(dict.fromkeys(_sample_ids(inputs)))
        loss = super().training_step(model, inputs, *args, **kwargs)
        self._step_losses.append(loss.detach())  # read once per optimizer step, in _get_grad_norm: no sync here
        return loss

    def prediction_step(self, model, inputs, *args, **kwargs):
        _sample_ids(inputs)  # popped: the model's forward does not take them
        return super().prediction_step(model, inputs, *args, **kwargs)

    def _get_grad_norm(self, model, grad_norm=None):
        """Called once per optimizer step, after clipping and before optimizer.step(): where a non-finite step is
        caught before it reaches the weights."""
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        _drill_pause("VLTUNE_DRILL_STEP_SLEEP", "step %d's optimizer step" % (self.state.global_step + 1))
        bad = None
        losses = [x.float().reshape(-1) for x in self._step_losses or []]
        if losses:
            flat = torch.cat(losses)
            if not bool(torch.isfinite(flat).all()):
                bad = f"loss ({float(flat[~torch.isfinite(flat)][0])})"
        if bad is None and norm is not None and not math.isfinite(float(norm)):
            bad = f"gradient norm ({float(norm)})"
        ids, self._step_ids, self._step_losses = list(self._step_ids or {}), {}, []
        if not any_rank(bad is not None, self.args.device):
            return norm
        ids = gather_lists(ids)
        step = self.state.global_step + 1
        shown = ", ".join(map(str, ids[:16])) + (f" and {len(ids) - 16} more" if len(ids) > 16 else "")
        what = f"non-finite {bad or 'value on another process'} at step {step}, batch samples: {shown or 'unknown'}"
        kept = newest_complete(self.args.output_dir)
        kept = f"the last complete checkpoint is {kept}" if kept else "no checkpoint was saved yet"
        if self.nonfinite != "skip":
            raise RunStopped(RunStopped.NONFINITE, f"{what}. The weights were not updated with it and {kept}. Look "
                             f"at those samples (a broken one, or a learning rate too high), or train on with "
                             f"--nonfinite skip", resumable=False)
        self.nonfinite_steps += 1
        if self.nonfinite_steps > self.max_nonfinite_steps:
            raise RunStopped(RunStopped.NONFINITE, f"{what}: {self.nonfinite_steps} non-finite steps, more than "
                             f"--max_nonfinite_steps {self.max_nonfinite_steps}; {kept}. The data or the learning "
                             f"rate needs a look", resumable=False)
        logger.warning("[train] %s: step skipped (weights and optimizer state untouched; %d skipped so far, at most "
                       "%d)", what, self.nonfinite_steps, self.max_nonfinite_steps)
        # No gradient at all: torch's optimizers then leave every parameter and its moments as they are.
        model.zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------ complete checkpoints
    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        main = self.args.should_save
        if main and os.path.isdir(folder):
            # Left by an earlier run that was killed after this step (or while saving it): never mixed with ours.
            logger.warning("[checkpoint] %s exists from an earlier run (%s): replacing it", folder,
                           "complete" if is_complete(folder) else "incomplete")
            unmark(folder)
            shutil.rmtree(folder, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotated below, once marked
        failure = None
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:  # noqa: BLE001 -- every process must reach the collective below
            failure = e
        finally:
            self.args.save_total_limit = limit
        if any_rank(failure is not None, self.args.device):
            self._save_failed(folder, run_dir, failure)
        self.accelerator.wait_for_everyone()
        _drill_pause("VLTUNE_DRILL_SAVE_SLEEP", f"{folder} written, its marker", log=True)
        if main:
            mark_complete(folder, self.state.global_step)
            self._rotate(run_dir, limit, keep=folder)
        self.accelerator.wait_for_everyone()

    def _save_failed(self, folder: str, run_dir: str, failure: BaseException | None):
        if self.args.should_save:
            shutil.rmtree(folder, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        previous = newest_complete(run_dir)
        kept = f"the last complete checkpoint, {previous}, is intact" if previous else \
            "there is no earlier complete checkpoint"
        if failure is None:  # another process failed: it says why
            raise RunStopped(RunStopped.DISK_FULL, f"saving {folder} failed on another process; {kept}",
                             resumable=previous is not None)
        if is_disk_full(failure, run_dir):
            raise RunStopped(
                RunStopped.DISK_FULL,
                f"the disk holding {run_dir} is full ({_free(run_dir)}): saving {os.path.basename(folder)} failed "
                f"({type(failure).__name__}: {failure}); the partial checkpoint was removed and {kept}. Free space "
                f"(or lower --save_total_limit), then resume", resumable=previous is not None) from failure
        logger.error("[checkpoint] saving %s failed; the partial checkpoint was removed and %s", folder, kept)
        raise failure

    def _rotate(self, run_dir: str, limit: int | None, keep: str) -> None:
        """--save_total_limit over complete checkpoints (oldest step first), never the one just written nor the
        best one; incomplete leftovers of killed runs go too."""
        if not limit or limit <= 0:
            return
        ckpts = list_checkpoints(run_dir)
        best = self.state.best_model_checkpoint
        protected = {os.path.normpath(keep)} | ({os.path.normpath(best)} if best else set())
        for c in ckpts:
            if not c.complete and os.path.normpath(c.path) not in protected:
                logger.info("[checkpoint] removing incomplete %s (left by an interrupted save)", c.path)
                shutil.rmtree(c.path, ignore_errors=True)
        complete = [c for c in ckpts if c.complete]
        excess = len(complete) - max(limit, len([c for c in complete if os.path.normpath(c.path) in protected]))
        for c in complete:
            if excess <= 0:
                break
            if os.path.normpath(c.path) not in protected:
                unmark(c.path)
                shutil.rmtree(c.path, ignore_errors=True)
                excess -= 1


def _drill_pause(variable: str, before: str, log: bool = False) -> None:
    """The kill drills (tests/integration/test_drills.py) widen a window to kill in by setting `variable` to
    seconds: VLTUNE_DRILL_STEP_SLEEP before each optimizer step (so a tiny model's steps are slower than the
    drill's polling), VLTUNE_DRILL_SAVE_SLEEP between a checkpoint's data and its marker. Unset: nothing."""
    seconds = float(os.environ.get(variable, "0") or 0)
    if seconds:
        if log:
            logger.info("[checkpoint] %s: %s in %g s", variable, before, seconds)
        time.sleep(seconds)


def _sample_ids(inputs) -> list:
    """Pop the batch's sample ids (WithSampleIds) from a batch dict, or read GRPO's rows' `sample_id`."""
    if isinstance(inputs, dict):
        return list(inputs.pop(SAMPLE_IDS, None) or [])
    if isinstance(inputs, list):
        return [r["sample_id"] for r in inputs if isinstance(r, dict) and r.get("sample_id") is not None]
    return []


class WithSampleIds:
    """Wrap a collator: the batch also carries where each sample came from ("file:line", an episode frame), so a
    non-finite step can name its samples. SurvivingTrainer pops them before the forward."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collator(features)
        ids = []
        for f in features:
            for item in f.get("pack", [f]):
                sample = item.get("sample")
                ids.append(item.get("where") or getattr(sample, "where", None) or "?")
        batch[SAMPLE_IDS] = ids
        return batch


class Preemption(TrainerCallback):
    """SIGTERM (what Slurm and Kubernetes send before killing) or a first Ctrl-C: save a checkpoint at the end of
    the current step and stop; a second Ctrl-C stops at once (KeyboardInterrupt). A context manager that installs
    the handlers and gives the previous ones back; under torchrun the processes agree on the step (any process
    that got the signal stops them all)."""

    def __init__(self):
        self.signum: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        # os.write, not logging: a handler may interrupt a logging call that holds its lock.
        os.write(2, f"\nvltune: {name}: saving a checkpoint at the end of this step, then stopping"
                    f"{' (Ctrl-C again to stop at once, without saving)' if signum == signal.SIGINT else ''}\n".encode())

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(self.signum is not None, args.device):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def raise_if_stopped(self, output_dir: str) -> None:
        if self.stopped_at is None:
            return
        ckpt = newest_complete(output_dir)
        interrupted = self.signum == signal.SIGINT
        raise RunStopped(RunStopped.INTERRUPTED if interrupted else RunStopped.PREEMPTED,
                         f"{'Ctrl-C' if interrupted else 'SIGTERM' if self.signum else 'signal on another process'}: "
                         f"stopped at step {self.stopped_at}, checkpoint at {ckpt}", resumable=ckpt is not None)


def train(trainer, resume_from_checkpoint, args):
    """trainer.train with everything above: preemption handlers around it, --nonfinite from `args`, the count of
    skipped steps in the metrics and the log."""
    trainer.nonfinite = getattr(args, "nonfinite", "stop")
    trainer.max_nonfinite_steps = getattr(args, "max_nonfinite_steps", 0)
    with Preemption() as guard:
        trainer.add_callback(guard)
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    guard.raise_if_stopped(trainer.args.output_dir)
    skipped = getattr(trainer, "nonfinite_steps", 0)
    if skipped:
        logger.warning("[train] %d step(s) with a non-finite loss or gradient norm were skipped (--nonfinite skip)",
                       skipped)
    result.metrics["nonfinite_steps_skipped"] = skipped
    return result


def survivable(trainer_cls: type) -> type:
    """`trainer_cls` with SurvivingTrainer in front (a class per trainer, named after it)."""
    return type(f"Surviving{trainer_cls.__name__}", (SurvivingTrainer, trainer_cls), {})
