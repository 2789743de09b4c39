"""`[memory]` lines in the log: this process's resident memory at the start of training, after its first step
and at the end, so a run that leaks (per step, per sample, per skipped sample) shows it in train.log.

Two figures each time: the current RSS, and the peak RSS (the kernel's high-water mark, `ru_maxrss`). The peak
alone can hide growth behind the data check's or the model load's peak before the first step; the current RSS
after the first step vs at the end is the leak signal. Only this process: DataLoader workers are not counted.
"""

from __future__ import annotations

import logging
import os
import resource
import sys

from transformers import TrainerCallback

logger = logging.getLogger("vltune")


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mib() -> float | None:
    """The current resident set size in MiB (None where /proc is missing and psutil is not installed)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return None


def memory_line(when: str) -> str:
    rss = rss_mib()
    now = f"RSS {rss:.0f} MiB, " if rss is not None else ""
    return f"[memory] {when}: {now}peak RSS {peak_rss_mib():.0f} MiB"


class MemoryLogCallback(TrainerCallback):
    """Logs `memory_line` at train begin, after the first step of this process and at train end (main rank)."""

    def __init__(self):
        self._first_step_done = False

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            logger.info("%s", memory_line(f"train start (step {state.global_step})"))

    def on_step_end(self, args, state, control, **kwargs):
        if not self._first_step_done and state.is_world_process_zero:
            # the first step allocates what every later step reuses (optimizer state, autograd buffers)
            logger.info("%s", memory_line(f"after the first step (step {state.global_step})"))
        self._first_step_done = True

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            logger.info("%s", memory_line(f"train end (step {state.global_step})"))
