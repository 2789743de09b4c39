"""`--resume_from_checkpoint`: which checkpoint a run continues from, said in the log every time."""

from __future__ import annotations

import json
import logging
import os

from .errors import UsageError

logger = logging.getLogger("vltune")

# Fields of a run's arguments that belong to that run only: args.json (reusable with --config) leaves them out,
# so a new run from it neither resumes the old run's checkpoint nor writes into the old run's TensorBoard dir.
RUN_SPECIFIC = ("resume_from_checkpoint", "logging_dir", "local_rank", "overwrite_output_dir")


def wants_resume(value) -> bool:
    """Whether a --resume_from_checkpoint value asks to resume (unset / false: start fresh)."""
    return value not in (None, "", False, "false", "False")


def resumes_newest(value) -> bool:
    """Whether a --resume_from_checkpoint value means `true`: the newest complete checkpoint of the run."""
    return value in (True, "true", "True")


def resume_checkpoint(value, output_dir: str) -> str | None:
    """The checkpoint directory to resume from (None: start fresh). `true` = the newest COMPLETE checkpoint-N
    in `output_dir` (vltune.checkpoints: its marker was written last); an incomplete one (a run killed while
    saving it, a full disk) is skipped with a warning naming it. Logs where the run resumes from; a missing or
    incomplete checkpoint is a UsageError."""
    from .checkpoints import MARKER, is_complete, list_checkpoints

    if not wants_resume(value):
        return None
    if resumes_newest(value):
        ckpts = list_checkpoints(output_dir)
        complete = [c for c in ckpts if c.complete]
        chosen = complete[-1] if complete else None
        for c in ckpts:
            if not c.complete and (chosen is None or c.step > chosen.step):
                logger.warning("[resume] skipping %s: incomplete (no %s, or a file it lists changed; the run "
                               "stopped while saving it)", c.path, MARKER)
        if chosen is None:
            what = (f"only incomplete checkpoints ({', '.join(os.path.basename(c.path) for c in ckpts)})" if ckpts
                    else "no checkpoint-N directory")
            raise UsageError(f"--resume_from_checkpoint true: {what} in {output_dir}; give a complete checkpoint "
                             f"directory, or leave the flag out to start fresh")
        value = chosen.path
    path = os.path.expanduser(str(value))
    if not os.path.isdir(path):
        raise UsageError(f"--resume_from_checkpoint {value}: no such checkpoint directory; give a checkpoint-N "
                         f"directory of an earlier run, or leave the flag out to start fresh")
    if not is_complete(path):
        raise UsageError(f"--resume_from_checkpoint {value}: incomplete checkpoint (no {MARKER}, or a file it lists "
                         f"changed: the run stopped while saving it); give a complete one, or "
                         f"--resume_from_checkpoint true for the newest complete one of its run")
    step = "?"
    state = os.path.join(path, "trainer_state.json")
    if os.path.exists(state):
        with open(state, encoding="utf-8") as f:
            step = json.load(f).get("global_step", "?")
    logger.info("[resume] resuming from %s (global step %s): weights, optimizer, scheduler and data position",
                path, step)
    return path
