"""Record scripted Meta-World expert demos (metaworld.policies) with rendered cameras and an instruction.

    python -m vltune.vla.data.metaworld_demos --tasks button-press-topdown-v3,drawer-open-v3,drawer-close-v3 \\
        --episodes 50 --val_episodes 5 --out data/mw --format calvin
    python -m vltune.vla.data.metaworld_demos --tasks mt10 --cameras topview,corner --out data/mt10

Each episode uses its own seed (fresh object position: see vltune/vla/metaworld_env.py); training seeds are
`seed_base + i`, validation seeds follow them, and `vltune eval vla` uses seeds from EVAL_SEED_BASE on, so
evaluation positions are never training positions. Executed actions get Gaussian noise (`--action_noise`,
xyz only) while the *clean* expert action is recorded: the demos then show how to recover from small
drifts, which closed-loop control needs (DART-style). An episode is kept only if the expert succeeds;
it continues `--hold_steps` steps after success so the policy also learns to stay.
Cameras are stored under their Meta-World names (topview, corner, gripperPOV, ...: any camera of the XML).
The state is `--state proprio` (hand xyz + gripper opening, what a real robot knows) or `proprio+goal`
(+ the goal position: privileged, only the simulator knows it; see STATE_LAYOUTS in metaworld_env.py).
Writes `metaworld_demos.json` (tasks, seeds, object positions, expert success) beside the data.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from ...errors import UsageError
from ..metaworld_env import PRIVILEGED_STATES, STATE_LAYOUTS, TRAIN_SEED_BASE, MetaWorldEnv, expert_policy, \
    parse_tasks, state_vector
from .episodes import Episode

logger = logging.getLogger("vltune")


def record_episode(env: MetaWorldEnv, expert, seed: int, max_steps: int, action_noise: float, hold_steps: int,
                   rng: np.random.Generator, state: str = "proprio") -> tuple[Episode, bool, np.ndarray]:
    obs = env.reset(seed)
    start_pos = env.object_position(obs)
    frames = {cam: [] for cam in env.cameras}
    states, actions = [], []
    success, after = False, 0
    for _ in range(max_steps):
        for cam, img in env.render().items():
            frames[cam].append(img)
        states.append(state_vector(obs, state))
        action = np.clip(expert.get_action(obs), -1.0, 1.0).astype(np.float32)
        actions.append(action)
        executed = action.copy()
        if action_noise > 0:
            executed[:3] += rng.normal(0.0, action_noise, 3).astype(np.float32)
        obs, ok = env.step(executed)
        success = success or ok
        if success:
            after += 1
            if after > hold_steps:
                break
    images = {cam: np.stack(f) for cam, f in frames.items()}
    ep = Episode(instruction=env.instruction, task=env.task, actions=np.stack(actions), images=images,
                 state=np.stack(states), source=f"{env.task} seed {seed}")
    return ep, success, start_pos


def record_demos(tasks: list[str], out: str, episodes: int = 50, val_episodes: int = 5, fmt: str = "calvin",
                 cameras: tuple[str, ...] = ("topview",), image_size: int = 96, seed_base: int = TRAIN_SEED_BASE,
                 max_steps: int = 150, action_noise: float = 0.1, hold_steps: int = 5, state: str = "proprio") -> dict:
    from . import write_episodes

    if state not in STATE_LAYOUTS:
        raise ValueError(f"--state {state}: choose one of {', '.join(STATE_LAYOUTS)}")
    rng = np.random.default_rng(seed_base)
    splits: dict[str, list[Episode]] = {"training": [], "validation": []}
    meta = {"tasks": tasks, "cameras": list(cameras), "image_size": image_size, "state": state,
            "state_obs_indices": list(STATE_LAYOUTS[state]), "privileged_state": state in PRIVILEGED_STATES,
            "action_noise": action_noise,
            "max_steps": max_steps, "per_task": {}}
    t0 = time.time()
    for task in tasks:
        env = MetaWorldEnv(task, cameras, image_size)
        expert = expert_policy(task)
        info = {"instruction": env.instruction, "training_seeds": [], "validation_seeds": [], "positions": [],
                "failed_seeds": [], "lengths": []}
        seed = seed_base
        # failures allowed per task: over the whole task (both splits), so an expert that fails one try in eight
        # does not stop the run in the short validation split after 100 good training episodes
        max_failures = episodes + val_episodes + 10
        for split, n in (("training", episodes), ("validation", val_episodes)):
            kept = 0
            while kept < n:
                ep, ok, pos = record_episode(env, expert, seed, max_steps, action_noise, hold_steps, rng, state)
                if ok:
                    splits[split].append(ep)
                    info[f"{split}_seeds"].append(seed)
                    info["positions"].append(pos.round(5).tolist())
                    info["lengths"].append(len(ep))
                    kept += 1
                else:
                    info["failed_seeds"].append(seed)
                seed += 1
                if len(info["failed_seeds"]) > max_failures:
                    raise RuntimeError(f"{task}: the scripted expert failed {len(info['failed_seeds'])} times "
                                       f"(action_noise {action_noise} too high?)")
        env.close()
        meta["per_task"][task] = info
        logger.info("[demos] %s: %d+%d episodes, mean length %.1f, expert failures %d (%.0f s so far)", task,
                    episodes, val_episodes, np.mean(info["lengths"]), len(info["failed_seeds"]), time.time() - t0)
    for split, eps in splits.items():
        if eps:
            write_episodes(eps, out, fmt=fmt, split=split)
    meta["seconds"] = round(time.time() - t0, 1)
    Path(out, "metaworld_demos.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m vltune.vla.data.metaworld_demos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="button-press-topdown-v3,drawer-open-v3,drawer-close-v3",
                   help="comma-separated Meta-World tasks, or mt10 / mt50 (the 10 / 50 tasks of those benchmarks)")
    p.add_argument("--out", required=True)
    p.add_argument("--episodes", type=int, default=50, help="training episodes per task")
    p.add_argument("--val_episodes", type=int, default=5, help="validation episodes per task (for val loss)")
    p.add_argument("--format", default="calvin", choices=("calvin", "lerobot"))
    p.add_argument("--cameras", default="topview", help="Meta-World camera names, e.g. topview,corner,gripperPOV")
    p.add_argument("--state", default="proprio", choices=tuple(STATE_LAYOUTS),
                   help="proprio: hand xyz + gripper opening; proprio+goal: + the goal position (privileged: only a "
                        "simulator has it)")
    p.add_argument("--image_size", type=int, default=96)
    p.add_argument("--seed_base", type=int, default=TRAIN_SEED_BASE)
    p.add_argument("--max_steps", type=int, default=150)
    p.add_argument("--action_noise", type=float, default=0.1, help="std of noise on executed xyz actions")
    p.add_argument("--hold_steps", type=int, default=5)
    a = p.parse_args(argv)
    from ...console import setup_logging

    setup_logging()
    try:  # a wrong task or camera name: argparse's one-line error and status 2
        return record_demos(parse_tasks(a.tasks), a.out, a.episodes, a.val_episodes, a.format,
                            tuple(c.strip() for c in a.cameras.split(",") if c.strip()), a.image_size, a.seed_base,
                            a.max_steps, a.action_noise, a.hold_steps, a.state)
    except UsageError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
