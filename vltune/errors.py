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
