"""The in-memory form every robot-data reader returns and every writer takes: a list of `Episode`s.

Cameras are named: "static" (third-person / table camera) and "gripper" (wrist camera) are the CALVIN roles,
and any other name is a camera of its own (Meta-World's "topview", "corner", "gripperPOV"; a LeRobot
dataset's `observation.images.<name>`); a policy lists the names it reads. Actions are raw (un-normalised) float32; which of their dimensions are gripper commands is a policy setting
(`--gripper_dims`), not a property of the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CAMERAS = ("static", "gripper")  # CALVIN's roles (rgb_static, rgb_gripper)


def check_camera_name(name: str, where: str) -> str:
    """A camera name must be a plain identifier (it becomes a file or column name in every layout)."""
    if not name or not all(ch.isalnum() or ch in "_-" for ch in name):
        raise ValueError(f"{where}: camera name {name!r} must be letters, digits, '_' or '-'")
    return name


@dataclass
class Episode:
    instruction: str
    actions: np.ndarray  # (T, A) float32, raw
    images: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> (T, H, W, 3) uint8
    state: np.ndarray | None = None  # (T, S) float32 proprioception, optional
    task: str = ""
    source: str = ""  # where it came from, for error messages: "file.npz frames 120-183"

    def __post_init__(self):
        self.actions = np.asarray(self.actions, dtype=np.float32)
        if self.actions.ndim != 2:
            raise ValueError(f"{self.source or 'episode'}: actions must be (T, action_dim), got {self.actions.shape}")
        n = len(self.actions)
        for cam, frames in self.images.items():
            check_camera_name(cam, self.source or "episode")
            if len(frames) != n or frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"{self.source or 'episode'}: camera {cam!r} has frames of shape {frames.shape}; "
                                 f"expected ({n}, H, W, 3) to match {n} actions")
        if self.state is not None:
            self.state = np.asarray(self.state, dtype=np.float32)
            if len(self.state) != n:
                raise ValueError(f"{self.source or 'episode'}: {len(self.state)} state rows for {n} actions")

    def __len__(self) -> int:
        return len(self.actions)


def check_consistent(episodes: list[Episode], where: str) -> None:
    """All episodes share action/state dims and cameras; raise naming the first episode that differs."""
    if not episodes:
        raise ValueError(f"{where}: no episode found")
    first = episodes[0]
    for i, ep in enumerate(episodes):
        if ep.actions.shape[1] != first.actions.shape[1]:
            raise ValueError(f"{where}: episode {i} ({ep.source}) has action dim {ep.actions.shape[1]}, "
                             f"episode 0 has {first.actions.shape[1]}")
        if set(ep.images) != set(first.images):
            raise ValueError(f"{where}: episode {i} ({ep.source}) has cameras {sorted(ep.images)}, "
                             f"episode 0 has {sorted(first.images)}")
        if (ep.state is None) != (first.state is None) or (
                ep.state is not None and ep.state.shape[1] != first.state.shape[1]):
            raise ValueError(f"{where}: episode {i} ({ep.source}) state differs from episode 0's")
