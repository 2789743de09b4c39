"""Console + file logging: `train.log` holds the whole console output (the seeds' TeeLogger)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("vltune")


def setup_logging(level: int = logging.INFO) -> None:
    if getattr(setup_logging, "_done", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if is_main_process() else logging.WARNING)
    logger.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging._done = True  # type: ignore[attr-defined]


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
    """Context manager: copy stdout, stderr and the vltune logger into `path` (main process only)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self):
        if not is_main_process():
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")
        self.saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self.file)
        sys.stderr = _Tee(sys.stderr, self.file)
        for h in logger.handlers:
            if type(h) is logging.StreamHandler:  # ours only (not pytest's capture handlers)
                h.setStream(sys.stderr)
        return self

    def __exit__(self, *exc):
        if not is_main_process():
            return False
        sys.stdout, sys.stderr = self.saved
        for h in logger.handlers:
            if type(h) is logging.StreamHandler:  # ours only (not pytest's capture handlers)
                h.setStream(sys.stderr)
        self.file.close()
        return False
