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


def resume_checkpoint(value, output_dir: str) -> str | None:
    """The checkpoint directory to resume from (None: start fresh). `true` = the newest checkpoint-N in
    `output_dir`. Logs where the run resumes from; a missing checkpoint is a UsageError."""
    if value in (None, "", False, "false", "False"):
        return None
    if value in (True, "true", "True"):
        from transformers.trainer_utils import get_last_checkpoint

        found = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if found is None:
            raise UsageError(f"--resume_from_checkpoint true: no checkpoint-N directory in {output_dir}; "
                             f"give a checkpoint directory, or leave the flag out to start fresh")
        value = found
    path = os.path.expanduser(str(value))
    if not os.path.isdir(path):
        raise UsageError(f"--resume_from_checkpoint {value}: no such checkpoint directory; give a checkpoint-N "
                         f"directory of an earlier run, or leave the flag out to start fresh")
    step = "?"
    state = os.path.join(path, "trainer_state.json")
    if os.path.exists(state):
        with open(state, encoding="utf-8") as f:
            step = json.load(f).get("global_step", "?")
    logger.info("[resume] resuming from %s (global step %s): weights, optimizer, scheduler and data position",
                path, step)
    return path
