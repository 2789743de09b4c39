"""Meta-World environments for demos and closed-loop evaluation, with fresh object positions per seed.

`Meta-World/MT1` draws 50 fixed object positions when the env is built, and its RandomTaskSelectWrapper
calls `set_task` with one of them on every reset (which also freezes the random vector again), before
`reset(seed=...)` applies: held-out seeds silently repeat training positions (formats.md, "MT1 seeding
trap"). `MetaWorldEnv` therefore resets *below* that wrapper, turns the freeze off (`_freeze_rand_vec =
False`, `seeded_rand_vec = True`) and seeds the unwrapped env per episode, so every seed draws its own
continuous position and train and test seeds can be kept disjoint (tests/integration/test_eval_vla.py checks it).

Rendering uses our own `mujoco.Renderer` on the env's model/data with shadows and reflections off
(~14-20 ms a frame at 96 px on CPU instead of ~80). On a machine without a display, set
`MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa` (Debian: `apt-get install libosmesa6`); `setup_headless_gl`
does it when nothing is set.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import UsageError

# Instructions per task (the policy is language-conditioned: one multi-task policy for all of them).
INSTRUCTIONS = {
    "button-press-topdown-v3": "press the button from the top",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "reach-v3": "reach to the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
}
# Meta-World MT10 (the 10 tasks of the MT10 benchmark, v3 environments).
MT10 = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3")
# What the policy's state vector holds, taken from Meta-World's 39-dim observation. `proprio` is what a real
# robot knows about itself (hand xyz, gripper opening); the goal position is known only to the simulator
# (reach-v3's target is a sphere of 1-2 px at 96 px in `corner`, and `topview` cannot show its height), so
# `proprio+goal` is privileged and named so in reports.
STATE_LAYOUTS = {
    "proprio": (0, 1, 2, 3),
    "proprio+goal": (0, 1, 2, 3, 36, 37, 38),
}
PRIVILEGED_STATES = ("proprio+goal",)
TRAIN_SEED_BASE = 0  # demos use seeds TRAIN_SEED_BASE + i
EVAL_SEED_BASE = 1_000_000  # evaluation seeds: disjoint from any demo seed


def state_vector(obs: np.ndarray, layout: str = "proprio") -> np.ndarray:
    """The policy's state from a Meta-World observation (STATE_LAYOUTS)."""
    if layout not in STATE_LAYOUTS:
        raise ValueError(f"state layout {layout!r}: choose one of {', '.join(STATE_LAYOUTS)}")
    return np.asarray(obs, np.float32)[list(STATE_LAYOUTS[layout])]


def layout_for_length(n: int) -> str:
    """The state layout whose vector has n dims (the layouts have distinct lengths)."""
    for name, idx in STATE_LAYOUTS.items():
        if len(idx) == n:
            return name
    raise ValueError(f"no Meta-World state layout has {n} dims ({', '.join(f'{k}: {len(v)}' for k, v in STATE_LAYOUTS.items())})")


def parse_tasks(spec: str, flag: str = "--tasks") -> list[str]:
    """`mt10`, `mt50` or comma-separated Meta-World task names -> the task list, every name checked."""
    require_metaworld()
    import metaworld.env_dict as env_dict

    known = list(env_dict.ALL_V3_ENVIRONMENTS)
    benchmarks = {"mt10": list(MT10), "mt50": known}
    if spec.strip().lower() in benchmarks:
        return benchmarks[spec.strip().lower()]
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    for t in tasks:
        if t not in known:
            import difflib

            close = difflib.get_close_matches(t if t.endswith("-v3") else f"{t}-v3", known, n=1)
            raise UsageError(f"{flag} {spec}: {t!r} is not a Meta-World v3 task"
                             f"{f' (did you mean {close[0]}?)' if close else ''}; give names like reach-v3,push-v3, "
                             f"or mt10 / mt50")
    if not tasks:
        raise UsageError(f"{flag} {spec!r}: give Meta-World task names (e.g. reach-v3,push-v3), or mt10 / mt50")
    return tasks


def setup_headless_gl() -> None:
    """Use OSMesa (software GL) when no GL backend was chosen and there is no display."""
    if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "osmesa"
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")


def require_metaworld():
    """Import metaworld + mujoco, or raise ImportError saying what to install.

    Without a GL library, `import mujoco` under MUJOCO_GL=osmesa fails inside PyOpenGL with an AttributeError
    (`'NoneType' object has no attribute 'glGetError'`), not an ImportError: it is turned into one here."""
    try:
        import metaworld  # noqa: F401
        import mujoco  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"Meta-World is not installed ({e}). Install the VLA extra: pip install -e '.[vla]' "
            "(metaworld, mujoco, gymnasium); for CPU rendering also `apt-get install -y libosmesa6`") from e
    except AttributeError as e:
        raise ImportError(
            f"MuJoCo could not load its OpenGL backend (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: {e}). On a "
            "machine without a display install Debian's OSMesa: apt-get install -y libosmesa6") from e


def expert_policy(task: str):
    """The scripted expert of `task` from metaworld.policies (its ENV_POLICY_MAP: drawer-open-v3 ->
    SawyerDrawerOpenV3Policy, peg-insert-side-v3 -> SawyerPegInsertionSideV3Policy)."""
    import metaworld.policies as policies

    experts = getattr(policies, "ENV_POLICY_MAP", {})
    if task in experts:
        return experts[task]()
    name = "Sawyer" + "".join(p.capitalize() for p in task.replace("-v3", "").split("-")) + "V3Policy"
    if not hasattr(policies, name):
        raise ValueError(f"no scripted expert for task {task!r} in metaworld.policies (neither in ENV_POLICY_MAP "
                         f"nor as {name})")
    return getattr(policies, name)()


def _below_task_select(env):
    """(the wrapper chain under MT1's (Pseudo)RandomTaskSelectWrapper, whose reset re-applies a fixed task;
    that wrapper's task list)."""
    e = env
    while hasattr(e, "env"):
        if type(e).__name__ in ("RandomTaskSelectWrapper", "PseudoRandomTaskSelectWrapper"):
            return e.env, e.tasks
        e = e.env
    raise RuntimeError("Meta-World/MT1 without a task-select wrapper: this metaworld version is not supported "
                       "(tested with metaworld 3.1)")


class MetaWorldEnv:
    """One Meta-World task with fresh positions per seed and fast rendering of named cameras."""

    def __init__(self, task: str, cameras: tuple[str, ...] = ("topview",), image_size: int = 96,
                 cameras_from: str | None = None):
        """cameras_from: how the user chose `cameras`, for the error that names one the task lacks (default
        `--cameras <cameras>`)."""
        setup_headless_gl()
        require_metaworld()
        import warnings

        import gymnasium as gym
        import metaworld  # noqa: F401  (registers the Meta-World/* envs)
        import mujoco

        warnings.filterwarnings("ignore", module="gymnasium")
        self.task, self.cameras, self.image_size = task, tuple(cameras), image_size
        self.env, tasks = _below_task_select(gym.make("Meta-World/MT1", env_name=task))
        self.unwrapped = self.env.unwrapped
        self.unwrapped.set_task(tasks[0])  # once, for the task's settings; its fixed position is then unfrozen
        self.unwrapped._freeze_rand_vec = False  # a fresh continuous position per reset ...
        self.unwrapped.seeded_rand_vec = True  # ... drawn from the env's seeded generator
        model = self.unwrapped.model
        names = [model.camera(i).name for i in range(model.ncam)]
        unknown = [c for c in self.cameras if c not in names]
        if unknown:
            self.env.close()
            raise UsageError(f"{cameras_from or '--cameras ' + ','.join(self.cameras)}: {task} has no camera "
                             f"{', '.join(unknown)}; its cameras are {', '.join(names)}")
        self.renderer = mujoco.Renderer(model, image_size, image_size)
        self._flags = (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION)
        self.instruction = INSTRUCTIONS.get(task, task.replace("-v3", "").replace("-", " "))

    def reset(self, seed: int) -> np.ndarray:
        self.unwrapped.seed(int(seed))
        obs, _ = self.env.reset()
        return obs

    def step(self, action) -> tuple[np.ndarray, bool]:
        obs, _, _, _, info = self.env.step(np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0))
        return obs, bool(info.get("success", False))

    def render(self) -> dict[str, np.ndarray]:
        """{camera: uint8 (H, W, 3)}; cameras named as in the Meta-World XML (topview, corner, gripperPOV, ...)."""
        out = {}
        for cam in self.cameras:
            self.renderer.update_scene(self.unwrapped.data, camera=cam)
            for f in self._flags:
                self.renderer.scene.flags[f] = 0
            out[cam] = self.renderer.render().copy()
        return out

    def object_position(self, obs: np.ndarray) -> np.ndarray:
        return np.asarray(obs[4:7], dtype=np.float32)

    def close(self) -> None:
        self.renderer.close()
        self.env.close()
