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
    _step_ids: list | None = None
    _step_bad: str | None = None

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


def survivable(trainer_cls: type) -> type:
    """`trainer_cls` with SurvivingTrainer in front (a class per trainer, named after it)."""
    return type(f"Surviving{trainer_cls.__name__}", (SurvivingTrainer, trainer_cls), {})
