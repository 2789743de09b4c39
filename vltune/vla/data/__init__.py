"""Robot demonstration data: readers and writers by layout, imported lazily.

    read_episodes("data/task_D_D", fmt="calvin", split="training") -> list[Episode]
    write_episodes(episodes, "out/", fmt="lerobot")

Layouts (formats.md): `calvin` (one npz per frame + language windows; packed into a cache on first read)
and `lerobot` (LeRobotDataset v3.0: parquet + mp4).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ...errors import UsageError

from .episodes import Episode, check_consistent

# name -> module holding read(path, **kw) and write(episodes, path, **kw)
FORMATS = {
    "calvin": "vltune.vla.data.calvin",
    "lerobot": "vltune.vla.data.lerobot",
}


def detect_format(path: str) -> str:
    if not Path(path).expanduser().exists():
        raise UsageError(f"--dataset {path}: does not exist; give a CALVIN or LeRobot v3 directory (or leave "
                         f"--dataset out for the synthetic reaching set)")
    p = Path(path)
    if (p / "meta" / "info.json").exists():
        return "lerobot"
    if (p / "ep_start_end_ids.npy").exists() or (p / "training" / "ep_start_end_ids.npy").exists():
        return "calvin"
    raise UsageError(f"--dataset {path}: not a CALVIN directory (no ep_start_end_ids.npy, nor training/ep_start_end_ids.npy) "
                     f"nor a LeRobot v3 dataset (no meta/info.json); pass --data_format calvin|lerobot")


def _module(fmt: str):
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[fmt])


def read_episodes(path: str, fmt: str = "auto", **kwargs) -> list[Episode]:
    fmt = detect_format(path) if fmt in (None, "", "auto") else fmt
    episodes = _module(fmt).read(path, **kwargs)
    check_consistent(episodes, path)
    return episodes


def write_episodes(episodes: list[Episode], path: str, fmt: str = "calvin", **kwargs) -> str:
    check_consistent(episodes, "episodes to write")
    return _module(fmt).write(episodes, path, **kwargs)


__all__ = ["Episode", "FORMATS", "detect_format", "read_episodes", "write_episodes"]
