"""Console + file logging: `train.log` holds the whole console output (the seeds' TeeLogger)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("vltune")


class _CurrentStderrHandler(logging.StreamHandler):
    """A handler that writes to whatever `sys.stderr` is when a record is emitted.

    A plain `StreamHandler(sys.stderr)` keeps the stream object it was built with: a later swap of
    `sys.stderr` (TeeLog, pytest's capture, a caller's redirect) would not reach it, and restoring it by hand
    is what used to leave a handler pointing at a dead stream. Reading `sys.stderr` at emit time needs no
    restoring at all (the same idea as `logging.lastResort`)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the current sys.stderr always wins
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Give the `vltune` logger its console handler (once per process)."""
    if any(isinstance(h, _CurrentStderrHandler) for h in logger.handlers):
        return
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if is_main_process() else logging.WARNING)
    logger.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class _Tee:
    """Write to the terminal and to a file; progress-bar redraws ("\\r" without newline) stay off the file."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.stream.write(text)
        if "\r" in text:
            text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))
            if not text.strip():
                return len(text)
        try:
            self.file.write(text)
            self.file.flush()
        except ValueError:  # file closed at interpreter shutdown
            pass
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class TeeLog:
    """Context manager: copy stdout, stderr and the vltune logger into `path` (main process only).

    It puts back exactly what it replaced, whatever happens inside: on an exception, when nested (the inner
    one restores the outer one's tee), and when someone else swapped a stream meanwhile (that stream is left
    to its owner, only our own tee is taken out). The logger needs nothing: its handler writes to the
    current `sys.stderr`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tees: dict[str, _Tee] = {}

    def __enter__(self):
        if not is_main_process():
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")
        for name in ("stdout", "stderr"):
            self._tees[name] = _Tee(getattr(sys, name), self.file)
            setattr(sys, name, self._tees[name])
        return self

    def __exit__(self, *exc):
        for name, tee in self._tees.items():
            if getattr(sys, name) is tee:
                setattr(sys, name, tee.stream)
            else:  # swapped by someone else meanwhile: theirs stays, and our tee stops writing to the file
                tee.file = _Closed()
        self._tees.clear()
        if getattr(self, "file", None) is not None:
            self.file.close()
            self.file = None
        return False


class _Closed:
    """Stands in for the log file of a TeeLog that has ended."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
