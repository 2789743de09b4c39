"""Meta-World smoke: scripted demos with fresh positions, a tiny policy, a closed-loop rollout with a GIF.

Skipped where metaworld/mujoco are not installed or no GL backend renders (CPU: libosmesa6).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest


@pytest.fixture(scope="module")
def metaworld_env():
    from vltune.vla.metaworld_env import require_metaworld, setup_headless_gl

    with pytest.MonkeyPatch.context() as mp:  # the GL variables must not outlive this module
        for name in ("MUJOCO_GL", "PYOPENGL_PLATFORM"):
            if name in os.environ:
                mp.setenv(name, os.environ[name])
            else:
                mp.delenv(name, raising=False)
        setup_headless_gl()  # before mujoco is imported: it picks its GL backend once
        try:
            require_metaworld()
        except ImportError as e:  # not installed, or no GL library (libosmesa6) for CPU rendering
            pytest.skip(str(e))
        from vltune.vla.metaworld_env import MetaWorldEnv

        try:
            env = MetaWorldEnv("reach-v3", ("topview",), 64)
            env.reset(0)
            frame = env.render()["topview"]
        except Exception as e:  # a GL backend that imports but does not render
            pytest.skip(f"Meta-World rendering unavailable here: {e}")
        assert frame.shape == (64, 64, 3) and frame.std() > 0
        yield env
        env.close()


def test_fresh_position_per_seed_not_the_mt1_fifty(metaworld_env):
    env = metaworld_env
    a = env.object_position(env.reset(7))
    b = env.object_position(env.reset(8))
    again = env.object_position(env.reset(7))
    np.testing.assert_array_equal(a, again)  # a seed always gives the same position ...
    assert np.abs(a - b).max() > 1e-4  # ... and another seed another one
    positions = {tuple(np.round(env.object_position(env.reset(s)), 5)) for s in range(60)}
    assert len(positions) == 60, "MT1 reuses 50 fixed positions unless _freeze_rand_vec is off"


def test_demos_train_and_closed_loop_eval(metaworld_env, tmp_path):
    from vltune.recipes.eval_vla import main as eval_main
    from vltune.recipes.vla import main as vla_main
    from vltune.vla.data.metaworld_demos import record_demos

    data = tmp_path / "mw"
    meta = record_demos(["reach-v3"], str(data), episodes=2, val_episodes=1, image_size=64, hold_steps=0)
    info = meta["per_task"]["reach-v3"]
    assert info["training_seeds"] == [0, 1] and info["validation_seeds"] == [2] and not info["failed_seeds"]
    assert json.loads((data / "metaworld_demos.json").read_text())["tasks"] == ["reach-v3"]
    res = vla_main(["--dataset", str(data), "--tiny_size", "xs", "--output_dir", str(tmp_path / "p"),
                    "--max_steps", "2", "--report_to", "none", "--save_strategy", "no", "--image_size", "64",
                    # one task: its gripper effort is constant, which minmax cannot scale (a clear error otherwise)
                    "--norm_action", "bounds", "--norm_min", "-1", "--norm_max", "1"])
    assert res.config.action_dim == 4 and res.config.state_dim == 4
    report = eval_main(["--policy", str(tmp_path / "p"), "--tasks", "reach-v3", "--episodes", "2",
                        "--max_episode_steps", "8", "--image_size", "64", "--train_data", str(data),
                        "--videos_per_task", "1"])
    (task,) = report["tasks"]
    assert task["episodes"] == 2 and len(task["lengths"]) == 2 and task["successes"] in (0, 1, 2)
    assert task["success_rate"] == task["successes"] / 2 and report["mean_success_rate"] == task["success_rate"]
    assert all(1 <= n <= 8 for n in task["lengths"])  # within the --max_episode_steps budget
    assert min(task["seeds"]) >= 1_000_000 and task["min_distance_to_training"] > 0 and task["mean_distance_to_training"] > 0
    assert report["latency"]["p50_ms"] > 0
    gifs = list((tmp_path / "p" / "eval" / "videos").glob("reach-v3_ep00_*.gif"))
    assert len(gifs) == 1
    md = (tmp_path / "p" / "eval" / "eval_report.md").read_text()
    assert "Mean success" in md and f"({task['successes']}/2)" in md
