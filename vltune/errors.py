"""The user's mistakes, as opposed to vltune's bugs.

Library code raises `UsageError` for a wrong flag value, a missing file, data that cannot be used, ...:
the message is ONE line that names the flag or file, says what was wrong and how to fix it.
`vltune.cli.main` catches it once, prints `vltune <command>: <message>` on stderr and exits with status 2.
Anything else is a bug in vltune and keeps its traceback; `VLTUNE_DEBUG=1` shows the traceback of a
`UsageError` too. This module imports nothing, so every layer can use it.
"""

from __future__ import annotations


class UsageError(Exception):
    """A mistake of the user's: one line naming the flag or file, what was wrong and the fix."""


class RunStopped(Exception):
    """A training run that stopped on purpose before its end: preempted (SIGTERM, Ctrl-C), a full disk, a
    non-finite loss. `vltune.cli.main` prints `message` (one line), then how to resume when `resumable`, and
    exits with `status`: each cause its own, so a job script can tell a preemption from a failure."""

    # Exit statuses (sysexits.h where one fits; 130 is the shells' own for Ctrl-C).
    NONFINITE = 65  # EX_DATAERR: the data (or the learning rate) gave a NaN/inf loss
    DISK_FULL = 74  # EX_IOERR
    PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM; run again to continue
    INTERRUPTED = 130

    def __init__(self, status: int, message: str, resumable: bool = True):
        super().__init__(message)
        self.status, self.message, self.resumable = status, message, resumable
