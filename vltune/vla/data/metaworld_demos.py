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
Each finished task is also kept in `<out>/.partial/` until the data set is written, so a recording that is
stopped (Ctrl-C, a crash, a lost machine) resumes after its last finished task when the same command runs again;
the resumed data set is the one an uninterrupted run writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shutil
import sys
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


PARTIAL_DIR = ".partial"  # <out>/.partial: the finished tasks of a recording that has not written its data set yet


def _load_partial(partial: Path, settings: dict, tasks: list[str]) -> list[dict]:
    """The finished tasks a stopped recording with these settings left, in task order (each: its episodes, its
    metaworld_demos.json entry and the noise generator's state after it). Other settings' leftovers are removed."""
    if not partial.is_dir():
        return []
    try:
        same = json.loads((partial / "settings.json").read_text()) == settings
    except (OSError, ValueError):
        same = False
    if not same:
        logger.info("[demos] %s holds a stopped recording made with other settings; starting over", partial)
        shutil.rmtree(partial)
        return []
    done = []
    for task in tasks:  # tasks are recorded in order, one noise generator through all of them
        f = partial / f"{task}.pkl"
        if not f.is_file():
            break
        with f.open("rb") as fh:
            done.append(pickle.load(fh))
    return done


def _save_partial(partial: Path, settings: dict, task: str, record: dict) -> None:
    if not (partial / "settings.json").is_file():  # written with the first finished task
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "settings.json").write_text(json.dumps(settings, indent=1))
    tmp = partial / f"{task}.pkl.tmp"
    with tmp.open("wb") as fh:
        pickle.dump(record, fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, partial / f"{task}.pkl")  # a task file is whole or absent


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
    # everything that decides the episodes: a stopped recording resumes only under the same settings
    settings = {"tasks": tasks, "episodes": episodes, "val_episodes": val_episodes, "cameras": list(cameras),
                "image_size": image_size, "seed_base": seed_base, "max_steps": max_steps,
                "action_noise": action_noise, "hold_steps": hold_steps, "state": state}
    partial = Path(out, PARTIAL_DIR)
    earlier = 0.0  # seconds the stopped recording spent on the tasks it finished
    for record in _load_partial(partial, settings, tasks):
        task = record["task"]
        for split in splits:
            splits[split] += record[split]
        meta["per_task"][task] = record["info"]
        rng.bit_generator.state = record["rng_state"]
        earlier = record["seconds"]
        logger.info("[demos] %s: taken from the stopped recording in %s", task, partial)
    t0 = time.time() - earlier
    for task in tasks[len(meta["per_task"]):]:
        env = MetaWorldEnv(task, cameras, image_size)
        expert = expert_policy(task)
        info = {"instruction": env.instruction, "training_seeds": [], "validation_seeds": [], "positions": [],
                "failed_seeds": [], "lengths": []}
        seed = seed_base
        task_eps: dict[str, list[Episode]] = {"training": [], "validation": []}
        # failures allowed per task: over the whole task (both splits), so an expert that fails one try in eight
        # does not stop the run in the short validation split after 100 good training episodes
        max_failures = episodes + val_episodes + 10
        for split, n in (("training", episodes), ("validation", val_episodes)):
            kept = 0
            while kept < n:
                ep, ok, pos = record_episode(env, expert, seed, max_steps, action_noise, hold_steps, rng, state)
                if ok:
                    task_eps[split].append(ep)
                    info[f"{split}_seeds"].append(seed)
                    info["positions"].append(pos.round(5).tolist())
                    info["lengths"].append(len(ep))
                    kept += 1
                else:
                    info["failed_seeds"].append(seed)
                seed += 1
                if len(info["failed_seeds"]) > max_failures:
                    shutil.rmtree(partial, ignore_errors=True)  # the same command would fail here again
                    raise UsageError(f"{task}: the scripted expert failed {len(info['failed_seeds'])} of "
                                     f"{seed - seed_base} tries, more than the {max_failures} allowed "
                                     f"(--episodes + --val_episodes + 10); lower --action_noise (now {action_noise})"
                                     f" or raise --max_steps (now {max_steps})")
        env.close()
        for split in splits:
            splits[split] += task_eps[split]
        meta["per_task"][task] = info
        _save_partial(partial, settings, task, {"task": task, **task_eps, "info": info,
                                                "rng_state": rng.bit_generator.state, "seconds": time.time() - t0})
        logger.info("[demos] %s: %d+%d episodes, mean length %.1f, expert failures %d (%.0f s so far)", task,
                    episodes, val_episodes, np.mean(info["lengths"]), len(info["failed_seeds"]), time.time() - t0)
    for split, eps in splits.items():
        if eps:
            write_episodes(eps, out, fmt=fmt, split=split)
    meta["seconds"] = round(time.time() - t0, 1)
    Path(out, "metaworld_demos.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(partial, ignore_errors=True)  # the data set is written: nothing left to resume
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
    except KeyboardInterrupt:
        print(f"{p.prog}: stopped; the same command resumes after the last finished task (kept in "
              f"{Path(a.out, PARTIAL_DIR)})", file=sys.stderr)
        sys.exit(130)  # the shells' status for Ctrl-C


if __name__ == "__main__":
    main()
