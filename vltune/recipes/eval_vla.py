"""vltune eval vla: closed-loop success of a policy in simulation, rollout videos, and step latency.

    vltune eval vla --policy out/mw --env metaworld \\
        --tasks button-press-topdown-v3,drawer-open-v3,drawer-close-v3 --episodes 20 --max_episode_steps 150
    vltune eval vla --policy out/mt10 --tasks mt10 --episodes 20 --max_episode_steps 300   # the 10 MT10 tasks
    vltune eval vla --policy out/mw --env none --latency_steps 200     # latency benchmark only
    vltune eval vla --policy_server http://127.0.0.1:8777 --tasks drawer-open-v3   # policy behind `vltune serve policy`

Held-out episodes: seed `--seed_base + 10000 * task_index + episode` with fresh object positions per seed
(vltune/vla/metaworld_env.py), disjoint from the demo seeds; with `--train_data <demo dir>` the report also
gives the smallest distance between an evaluation position and any training position of the task.
Writes eval_report.json, eval_report.md and GIF rollouts to --output_dir (default <policy>/eval).
With --policy_server the environment runs here and the policy behind the server (vltune/vla/client.py):
--chunk_threshold 0 (synchronous chunks) gives the same actions as --policy on the same seeds; above 0
the next chunk is fetched in the background and the report gives the control rate reached.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..args import parse_args
from ..console import setup_logging
from ..errors import UsageError
from ..hardware import torch_threads

logger = logging.getLogger("vltune")


@dataclass
class VLAEvalArguments:
    policy: str = field(default="output/vla", metadata={"help": "A `vltune vla` output or checkpoint directory."})
    policy_server: str | None = field(default=None, metadata={
        "help": "URL of a `vltune serve policy` server (e.g. http://127.0.0.1:8777): the env runs here, the "
                "policy there; replaces --policy."})
    chunk_threshold: float = field(default=0.0, metadata={
        "help": "With --policy_server: 0 = synchronous chunks (actions equal --policy's); 0-1 = fetch the next "
                "chunk in the background once fewer than this fraction of a chunk is queued."})
    aggregate: str = field(default="weighted_average", metadata={
        "help": "With --policy_server and asynchronous chunks, how overlapping actions blend: latest_only | "
                "weighted_average (0.3 old + 0.7 new) | average | conservative (0.7 old + 0.3 new)."})
    encoding: str = field(default="msgpack", metadata={"help": "With --policy_server: msgpack | json (json-numpy)."})
    api_key: str | None = field(default=None, metadata={"help": "With --policy_server: the server's --api_key."})
    record_actions: bool = field(default=False, metadata={
        "help": "Store every executed action in eval_report.json (to compare two runs step by step)."})
    env: str = field(default="metaworld", metadata={"help": "metaworld | none (latency benchmark only)."})
    tasks: str = field(default="button-press-topdown-v3,drawer-open-v3,drawer-close-v3", metadata={
        "help": "Comma-separated Meta-World tasks, or mt10 / mt50 (the instruction of each comes from "
                "vltune/vla/metaworld_env.py)."})
    episodes: int = field(default=20, metadata={"help": "Episodes per task."})
    max_episode_steps: int = field(default=150, metadata={"help": "Step budget: success must come within it."})
    cameras: str = field(default="auto", metadata={
        "help": "Meta-World cameras rendered for the policy's cameras, in the policy's order. auto = the policy's own "
                "camera names (demos record topview, corner, ...); a policy whose cameras are the CALVIN roles "
                "static[,gripper] gets topview[,gripperPOV]."})
    state: str = field(default="auto", metadata={
        "help": "The policy's state from Meta-World's observation: proprio (hand xyz + gripper) | proprio+goal "
                "(+ the goal position: privileged, simulator-only; the report says so) | auto = the layout whose "
                "length the policy reads (its demos' --state)."})
    image_size: int = field(default=96, metadata={"help": "Render size (the demos' size)."})
    seed_base: int = field(default=1_000_000, metadata={"help": "First evaluation seed (demo seeds start at 0)."})
    train_data: str | None = field(default=None, metadata={
        "help": "Demo directory (with metaworld_demos.json) to report how far evaluation positions are from "
                "training ones."})
    videos_per_task: int = field(default=1, metadata={
        "help": "GIF rollouts saved per task and outcome: the first N successes and the first N failures "
                "(every camera side by side)."})
    latency_steps: int = field(default=100, metadata={"help": "Steps of the latency benchmark (--env none)."})
    output_dir: str | None = field(default=None, metadata={"help": "Default: <policy>/eval."})
    threads: int = field(default=1, metadata={"help": "torch threads (1 = fair latency on a shared CPU)."})


@dataclass
class TaskResult:
    task: str
    instruction: str
    episodes: int
    successes: int
    success_rate: float
    mean_length: float  # steps, failures counted at the budget
    mean_success_length: float | None
    lengths: list[int]
    seeds: list[int]
    min_distance_to_training: float | None = None  # metres, over this task's evaluation episodes
    mean_distance_to_training: float | None = None  # metres: each evaluation position to its nearest training one
    control_hz: float | None = None  # control steps per second of wall time (render + policy + env step)
    actions: list | None = None  # per episode, per step: the executed action (--record_actions)


def latency_summary(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"steps": int(len(a)), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p95_ms": round(float(np.percentile(a, 95)), 2), "mean_ms": round(float(a.mean()), 2),
            "actions_per_s": round(1000.0 / float(a.mean()), 1)}


def benchmark_latency(policy, steps: int = 100, seed: int = 0) -> dict:
    """policy.step on random frames: p50/p95 ms per step and actions/s (first 5 steps are warm-up)."""
    rng = np.random.default_rng(seed)
    cfg = policy.config
    size = cfg.image_size
    state = np.zeros(max(cfg.state_indices, default=-1) + 1, np.float32) if cfg.state_dim else None
    policy.reset()
    ms = []
    for i in range(steps + 5):
        images = {c: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for c in cfg.cameras}
        t = time.perf_counter()
        policy.step(images, "benchmark", state)
        if i >= 5:
            ms.append((time.perf_counter() - t) * 1000)
    return latency_summary(ms)


def save_gif(frames: list[np.ndarray], path: Path, fps: int = 15) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    imgs = [Image.fromarray(f) for f in frames]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)


def _training_positions(train_data: str | None, task: str) -> np.ndarray | None:
    if not train_data:
        return None
    meta = Path(train_data, "metaworld_demos.json")
    if not meta.exists():
        raise FileNotFoundError(f"{meta} not found: --train_data must be a directory written by "
                                "vltune.vla.data.metaworld_demos")
    info = json.loads(meta.read_text())["per_task"].get(task)
    return None if info is None else np.asarray(info["positions"], np.float32)


ROLE_CAMERAS = {"static": "topview", "gripper": "gripperPOV"}  # CALVIN role -> Meta-World camera


def env_cameras(a: VLAEvalArguments, policy_cameras: list[str]) -> tuple[str, ...]:
    """--cameras -> the Meta-World cameras rendered for the policy's cameras (same order)."""
    if a.cameras == "auto":
        return tuple(ROLE_CAMERAS.get(c, c) for c in policy_cameras)
    cams = tuple(c.strip() for c in a.cameras.split(",") if c.strip())
    if len(cams) != len(policy_cameras):
        raise UsageError(f"--cameras {a.cameras}: the policy reads {len(policy_cameras)} camera(s) {policy_cameras}; "
                         f"pass one Meta-World camera for each, in that order, or --cameras auto")
    return cams


def state_layout(a: VLAEvalArguments, config) -> str:
    """--state -> a Meta-World state layout (vltune/vla/metaworld_env.py STATE_LAYOUTS) the policy can read."""
    from ..vla.metaworld_env import STATE_LAYOUTS

    need = max(config.state_indices) + 1 if config.state_dim else 0
    if a.state == "auto":
        fits = [k for k, v in STATE_LAYOUTS.items() if len(v) >= need]
        if not fits:
            raise UsageError(f"--policy {a.policy}: it reads {need} state values, more than any Meta-World state "
                             f"layout ({', '.join(STATE_LAYOUTS)}); evaluate a policy trained on vltune's demos")
        return min(fits, key=lambda k: len(STATE_LAYOUTS[k]))
    if a.state not in STATE_LAYOUTS:
        raise UsageError(f"--state {a.state}: choose auto or one of {', '.join(STATE_LAYOUTS)}")
    if len(STATE_LAYOUTS[a.state]) < need:
        raise UsageError(f"--state {a.state}: {len(STATE_LAYOUTS[a.state])} values, the policy reads {need}; "
                         f"use the --state its demos were recorded with (or auto)")
    return a.state


def evaluate_task(policy, task: str, task_index: int, a: VLAEvalArguments, out: Path, step_ms: list[float],
                  layout: str) -> TaskResult:
    from ..vla.metaworld_env import MetaWorldEnv, state_vector

    roles = list(policy.config.cameras)
    cams = env_cameras(a, roles)
    chosen = (f"--cameras auto (the policy's cameras {', '.join(roles)} -> Meta-World's {', '.join(cams)}; name one "
              f"Meta-World camera per policy camera with --cameras)") if a.cameras == "auto" else None
    env = MetaWorldEnv(task, cams, a.image_size, cameras_from=chosen)
    env_dim = int(env.env.action_space.shape[0])
    if policy.config.action_dim != env_dim:
        env.close()
        raise UsageError(f"--policy {a.policy_server or a.policy}: the policy outputs {policy.config.action_dim}-dim "
                         f"actions, Meta-World's {task} takes {env_dim} (xyz delta + gripper); evaluate a policy "
                         f"trained on Meta-World demos (python -m vltune.vla.data.metaworld_demos, then vltune vla)")
    train_pos = _training_positions(a.train_data, task)
    lengths, ok_lengths, successes, seeds, dists, actions = [], [], 0, [], [], []
    saved = {True: 0, False: 0}  # GIFs written per outcome
    loop_s, loop_steps = 0.0, 0
    for ep in range(a.episodes):
        seed = a.seed_base + 10_000 * task_index + ep
        obs = env.reset(seed)
        if train_pos is not None and len(train_pos):
            dists.append(float(np.linalg.norm(train_pos - env.object_position(obs), axis=1).min()))
        policy.reset()
        film = min(saved.values()) < a.videos_per_task  # an outcome still lacks its GIF: keep this episode's frames
        frames, success, steps, executed = [], False, a.max_episode_steps, []
        t_loop = time.perf_counter()
        for t in range(a.max_episode_steps):
            rendered = env.render() if policy.config.use_images or film else {}
            images = {role: rendered[cam] for role, cam in zip(roles, env.cameras)} if policy.config.use_images else {}
            if film:
                frames.append(np.concatenate([rendered[c] for c in env.cameras], axis=1))
            t0 = time.perf_counter()
            action = policy.step(images, env.instruction, state_vector(obs, layout))
            step_ms.append((time.perf_counter() - t0) * 1000)
            if a.record_actions:
                executed.append([float(v) for v in action])
            obs, ok = env.step(action)
            if ok:
                success, steps = True, t + 1
                break
        loop_s += time.perf_counter() - t_loop
        loop_steps += min(steps, a.max_episode_steps)
        if a.record_actions:
            actions.append(executed)
        successes += success
        lengths.append(steps)
        if success:
            ok_lengths.append(steps)
        seeds.append(seed)
        if frames and saved[success] < a.videos_per_task:
            saved[success] += 1
            save_gif(frames, out / "videos" / f"{task}_ep{ep:02d}_{'success' if success else 'fail'}.gif")
    env.close()
    return TaskResult(task=task, instruction=env.instruction, episodes=a.episodes, successes=successes,
                      success_rate=successes / a.episodes, mean_length=float(np.mean(lengths)),
                      mean_success_length=float(np.mean(ok_lengths)) if ok_lengths else None, lengths=lengths,
                      seeds=seeds, min_distance_to_training=round(min(dists), 5) if dists else None,
                      mean_distance_to_training=round(float(np.mean(dists)), 5) if dists else None,
                      control_hz=round(loop_steps / loop_s, 1) if loop_s else None,
                      actions=actions if a.record_actions else None)


def run_eval(a: VLAEvalArguments) -> dict:
    from ..vla.policy import Policy

    setup_logging()
    if not a.policy_server and not (Path(a.policy) / "policy_config.json").is_file():
        raise UsageError(f"--policy {a.policy}: no policy_config.json there; give the --output_dir of a `vltune vla` "
                         f"run (or one of its checkpoint-N folders), or --policy_server URL of a running server")
    if a.env not in ("metaworld", "none"):
        raise UsageError(f"--env {a.env}: choose metaworld or none (latency benchmark only)")
    tasks = []
    if a.env == "metaworld":
        from ..vla.metaworld_env import parse_tasks

        tasks = parse_tasks(a.tasks)  # a misspelt task fails here, before the policy is loaded
    out = Path(a.output_dir or (Path(a.policy) / "eval" if not a.policy_server else "output/eval_server"))
    out.mkdir(parents=True, exist_ok=True)
    client = None
    if a.policy_server:
        from ..vla.client import PolicyClient, RemotePolicy

        client = PolicyClient(a.policy_server, chunk_threshold=a.chunk_threshold, aggregate=a.aggregate,
                              encoding=a.encoding, api_key=a.api_key)
        policy = RemotePolicy(client)
        logger.info("[eval] policy behind %s (%s, %s chunks)", a.policy_server, a.encoding,
                    "synchronous" if client.synchronous else f"asynchronous, threshold {a.chunk_threshold}, "
                    f"{a.aggregate}")
    else:
        policy = Policy.from_pretrained(a.policy)
    report: dict = {"policy": a.policy_server or a.policy, "args": asdict(a), "use_images": policy.config.use_images}
    if a.env == "none":
        report["latency"] = benchmark_latency(policy, a.latency_steps)
        logger.info("[latency] p50 %.1f ms, p95 %.1f ms per step, %.1f actions/s", report["latency"]["p50_ms"],
                    report["latency"]["p95_ms"], report["latency"]["actions_per_s"])
    else:  # metaworld
        from ..vla.metaworld_env import PRIVILEGED_STATES

        layout = state_layout(a, policy.config)
        report["cameras"] = list(env_cameras(a, list(policy.config.cameras))) if policy.config.use_images else []
        report["state"] = layout if policy.config.state_dim else "none"
        report["privileged_state"] = bool(policy.config.state_dim) and layout in PRIVILEGED_STATES
        if report["privileged_state"]:
            logger.warning("[eval] state %s: the policy reads the goal position, which only the simulator knows "
                           "(privileged; images + proprio is the honest setting)", layout)
        step_ms: list[float] = []
        results = []
        t0 = time.time()
        for i, task in enumerate(tasks):
            r = evaluate_task(policy, task, i, a, out, step_ms, layout)
            results.append(r)
            logger.info("[eval] %s: %d/%d successes within %d steps (%.0f%%), mean length %.1f%s", task, r.successes,
                        r.episodes, a.max_episode_steps, 100 * r.success_rate, r.mean_length,
                        "" if r.min_distance_to_training is None else
                        f", nearest training position {r.mean_distance_to_training * 1000:.1f} mm on average "
                        f"(min {r.min_distance_to_training * 1000:.2f} mm)")
        report["tasks"] = [asdict(r) for r in results]
        report["mean_success_rate"] = float(np.mean([r.success_rate for r in results]))
        report["latency"] = latency_summary(step_ms)
        report["seconds"] = round(time.time() - t0, 1)
        report["control_hz"] = round(float(np.mean([r.control_hz for r in results if r.control_hz])), 1)
        if client is not None:
            report["client"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in client.stats.items()}
        logger.info("[eval] mean success %.1f%% over %d tasks; latency p50 %.1f ms, p95 %.1f ms, %.1f actions/s",
                    100 * report["mean_success_rate"], len(results), report["latency"]["p50_ms"],
                    report["latency"]["p95_ms"], report["latency"]["actions_per_s"])
    if client is not None:
        client.close()
    (out / "eval_report.json").write_text(json.dumps(report, indent=1))
    (out / "eval_report.md").write_text(_markdown(report))
    logger.info("[eval] report: %s", out / "eval_report.md")
    return report


def _markdown(r: dict) -> str:
    lines = [f"# Closed-loop evaluation of `{r['policy']}`", ""]
    if "tasks" in r:
        a = r["args"]
        lines += [f"{a['episodes']} episodes per task, success within {a['max_episode_steps']} steps, held-out seeds "
                  f"from {a['seed_base']} (fresh object positions); images "
                  f"{', '.join(r['cameras']) if r['use_images'] else 'OFF'}; state {r['state']}"
                  f"{' (PRIVILEGED: the goal position only a simulator knows)' if r['privileged_state'] else ''}.", "",
                  "| task | success | mean length | mean length (successes) | nearest training position: mean (min) |",
                  "|---|---|---|---|---|"]
        for t in r["tasks"]:
            d, m = t["min_distance_to_training"], t["mean_distance_to_training"]
            ok_len = "-" if t["mean_success_length"] is None else f"{t['mean_success_length']:.1f}"
            lines.append(f"| {t['task']} | {100 * t['success_rate']:.0f}% ({t['successes']}/{t['episodes']}) | "
                         f"{t['mean_length']:.1f} | {ok_len} | "
                         f"{'-' if d is None else f'{1000 * m:.1f} mm ({1000 * d:.2f} mm)'} |")
        lines += ["", f"**Mean success: {100 * r['mean_success_rate']:.1f}%**", ""]
    lat = r["latency"]
    lines += [f"Latency per step: p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms ({lat['actions_per_s']} actions/s)"
              + (f"; control loop {r['control_hz']} steps/s with rendering and physics." if "control_hz" in r else "."),
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    (a,) = parse_args((VLAEvalArguments,), argv, prog="vltune eval vla", description=__doc__)
    with torch_threads(a.threads):  # the caller's own setting comes back afterwards
        return run_eval(a)
