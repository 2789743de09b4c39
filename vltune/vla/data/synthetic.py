"""A small learnable robot task for tests and offline runs: move to the square the instruction names.

Each episode shows a red and a green square and a blue agent on a grey board; the instruction asks for one
colour. Arm dimensions 0-1 move the agent towards the named square (so the right action needs both the
image and the instruction), the other arm dimensions are fixed functions of the goal, and gripper dimensions
close (+1) when the agent is near the goal, else open (-1). Any action dimension >= 2 and any gripper index
list works; state is the agent position (+ zeros up to `state_dim`).
"""

from __future__ import annotations

import numpy as np

from .episodes import Episode

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60)}


def _draw(size: int, squares: dict[str, np.ndarray], agent: np.ndarray) -> np.ndarray:
    img = np.full((size, size, 3), 128, np.uint8)
    r = max(2, size // 12)

    def box(pos, colour, rad):
        cx, cy = (pos * (size - 1)).astype(int)
        img[max(0, cy - rad):cy + rad + 1, max(0, cx - rad):cx + rad + 1] = colour

    for name, pos in squares.items():
        box(pos, COLOURS[name], r)
    box(agent, (40, 60, 220), max(1, r // 2))
    return img


def make_episodes(n_episodes: int = 16, length: int = 12, action_dim: int = 7, gripper_dims=(6,),
                  image_size: int = 64, wrist_camera: bool = False, state_dim: int = 2, seed: int = 0) -> list[Episode]:
    if action_dim < 2:
        raise ValueError("the synthetic task needs action_dim >= 2 (two arm dimensions move the agent)")
    gripper_dims = sorted(set(int(d) % action_dim for d in (gripper_dims or ())))
    if set(gripper_dims) & {0, 1}:
        raise ValueError("dimensions 0 and 1 move the agent in the synthetic task; gripper dims must be >= 2")
    rng = np.random.default_rng(seed)
    episodes = []
    for e in range(n_episodes):
        squares = {name: rng.uniform(0.15, 0.85, 2) for name in COLOURS}
        goal_name = list(COLOURS)[e % len(COLOURS)]
        goal = squares[goal_name]
        agent = rng.uniform(0.1, 0.9, 2)
        static, wrist, actions, states = [], [], [], []
        for _ in range(length):
            static.append(_draw(image_size, squares, agent))
            if wrist_camera:  # a crude "wrist view": the board shifted so the agent sits at the centre
                shift = ((0.5 - agent) * image_size).astype(int)
                wrist.append(np.roll(static[-1], (shift[1], shift[0]), axis=(0, 1)))
            a = np.zeros(action_dim, np.float32)
            a[:2] = np.clip((goal - agent) * 3.0, -1, 1)
            for d in range(2, action_dim):
                if d in gripper_dims:
                    a[d] = 1.0 if np.linalg.norm(goal - agent) < 0.15 else -1.0
                else:
                    a[d] = np.sin(goal[0] * (d + 1)) * np.cos(goal[1] * d)
            actions.append(a)
            states.append(np.concatenate([agent, np.zeros(max(0, state_dim - 2))])[:state_dim].astype(np.float32))
            agent = np.clip(agent + a[:2] * 0.12, 0, 1)
        images = {"static": np.stack(static)}
        if wrist_camera:
            images["gripper"] = np.stack(wrist)
        episodes.append(Episode(instruction=f"move to the {goal_name} square", task=f"reach-{goal_name}",
                                actions=np.stack(actions), images=images,
                                state=np.stack(states) if state_dim else None, source=f"synthetic episode {e}"))
    return episodes


def make_dataset(out: str, fmt: str = "calvin", n_train: int = 16, n_val: int = 4, **kwargs) -> str:
    """Write a synthetic train (+ validation) set in the CALVIN or LeRobot v3 layout; return its directory."""
    from . import write_episodes

    seed = kwargs.pop("seed", 0)
    write_episodes(make_episodes(n_train, seed=seed, **kwargs), out, fmt=fmt, split="training")
    if n_val:
        write_episodes(make_episodes(n_val, seed=seed + 10_000, **kwargs), out, fmt=fmt, split="validation")
    return out
