"""Which checkpoint-N directories of a run are complete.

The HF Trainer writes a checkpoint file by file into its final name (weights, optimizer, scheduler, RNG,
trainer_state.json): a run killed during a save, or one whose disk filled up, leaves a checkpoint-N that looks
like the others but cannot be resumed from, or worse, resumes from half a state. vltune writes
`checkpoint_complete.json` into the directory LAST, after every process has written its part and the files
are flushed to disk; it lists each file with its size. A checkpoint counts only while that marker is there and
the files it lists still have those sizes. This module imports nothing heavy: `vltune.resume` uses it at
argument time.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

MARKER = "checkpoint_complete.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str
    complete: bool


def is_complete(path: str | os.PathLike) -> bool:
    """True when `path` holds vltune's marker and every file the marker lists has its recorded size."""
    marker = os.path.join(path, MARKER)
    try:
        with open(marker, encoding="utf-8") as f:
            files = json.load(f).get("files", {})
    except (OSError, ValueError):
        return False
    for rel, size in files.items():
        try:
            if os.path.getsize(os.path.join(path, rel)) != size:
                return False
        except OSError:
            return False
    return True


def list_checkpoints(output_dir: str | os.PathLike) -> list[Checkpoint]:
    """The checkpoint-N directories of `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path):
            found.append(Checkpoint(int(m.group(1)), path, is_complete(path)))
    return sorted(found, key=lambda c: c.step)


def newest_complete(output_dir: str | os.PathLike) -> str | None:
    complete = [c for c in list_checkpoints(output_dir) if c.complete]
    return complete[-1].path if complete else None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(path: str, step: int) -> None:
    """Flush every file of checkpoint `path` to disk, then write the marker (to a temporary name, renamed): a
    crash at any point leaves either no marker or a whole one, and never a marker before the data."""
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel in (MARKER, MARKER + ".tmp"):
                continue
            _fsync(full)  # a power loss after the marker must not find data still only in the page cache
            files[rel] = os.path.getsize(full)
    tmp = os.path.join(path, MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"global_step": step, "files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MARKER))
    _fsync(path)


def unmark(path: str) -> None:
    """Remove the marker first, so that a checkpoint being deleted or rewritten never counts half-way."""
    try:
        os.remove(os.path.join(path, MARKER))
    except FileNotFoundError:
        pass
