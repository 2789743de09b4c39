"""Data errors carry the location of the offending sample ("file:line")."""

from __future__ import annotations

from ..errors import UsageError


class DataError(UsageError, ValueError):
    """A sample (or data file) that cannot be used. `where` is "path:line" or "path[index]".
    A user's mistake: `vltune` prints it as one line and exits 2."""

    def __init__(self, message: str, where: str | None = None, kind: str | None = None):
        self.message = message
        self.where = where
        self.kind = kind or "invalid sample"
        super().__init__(f"{where}: {message}" if where else message)

    def at(self, where: str) -> "DataError":
        """The same error, located at `where` (keeps the subclass)."""
        import copy

        located = copy.copy(self)
        located.where = where
        located.args = (f"{where}: {self.message}",)
        return located


class SampleTooLong(DataError):
    def __init__(self, message: str, where: str | None = None):
        super().__init__(message, where, kind="over max_length")
