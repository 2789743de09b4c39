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


@pytest.fixture(scope="module")
def reach_policy(metaworld_env, tmp_path_factory):
    """(demo dir, its metadata, the trained policy's result) for reach-v3: 2 demos, a 2-step policy."""
    from vltune.recipes.vla import main as vla_main
    from vltune.vla.data.metaworld_demos import record_demos

    tmp = tmp_path_factory.mktemp("mw")
    data = tmp / "mw"
    meta = record_demos(["reach-v3"], str(data), episodes=2, val_episodes=1, image_size=64, hold_steps=0)
    res = vla_main(["--dataset", str(data), "--tiny_size", "xs", "--output_dir", str(tmp / "p"),
                    "--max_steps", "2", "--report_to", "none", "--save_strategy", "no", "--image_size", "64",
                    "--window_size", "1", "--fwd_pred_next_n", "3", "--exec_steps", "2"])
    return data, meta, res


def test_demos_train_and_closed_loop_eval(reach_policy, tmp_path):
    from vltune.recipes.eval_vla import main as eval_main

    data, meta, res = reach_policy
    info = meta["per_task"]["reach-v3"]
    assert info["training_seeds"] == [0, 1] and info["validation_seeds"] == [2] and not info["failed_seeds"]
    assert json.loads((data / "metaworld_demos.json").read_text())["tasks"] == ["reach-v3"]
    assert res.config.action_dim == 4 and res.config.state_dim == 4
    # one task: the gripper effort never changes; that dimension is kept constant instead of stopping the run
    assert res.config.constant_dims == [3] and res.config.gripper_dims == []
    report = eval_main(["--policy", res.output_dir, "--output_dir", str(tmp_path / "eval"), "--tasks", "reach-v3",
                        "--episodes", "2",
                        "--max_episode_steps", "8", "--image_size", "64", "--train_data", str(data),
                        "--videos_per_task", "1"])
    (task,) = report["tasks"]
    assert task["episodes"] == 2 and len(task["lengths"]) == 2 and task["successes"] in (0, 1, 2)
    assert task["success_rate"] == task["successes"] / 2 and report["mean_success_rate"] == task["success_rate"]
    assert all(1 <= n <= 8 for n in task["lengths"])  # within the --max_episode_steps budget
    assert min(task["seeds"]) >= 1_000_000 and task["min_distance_to_training"] > 0 and task["mean_distance_to_training"] > 0
    assert report["latency"]["p50_ms"] > 0
    gifs = list((tmp_path / "eval" / "videos").glob("reach-v3_ep00_*.gif"))
    assert len(gifs) == 1
    md = (tmp_path / "eval" / "eval_report.md").read_text()
    assert "Mean success" in md and f"({task['successes']}/2)" in md


def test_closed_loop_through_the_server_equals_in_process(reach_policy, tmp_path):
    """`eval vla --policy_server` with synchronous chunks: same actions, lengths and successes as `--policy`."""
    from vltune.recipes.eval_vla import main as eval_main
    from vltune.vla.policy import Policy
    from vltune.vla.server import create_app, running_server

    _, _, res = reach_policy
    common = ["--tasks", "reach-v3", "--episodes", "2", "--max_episode_steps", "7", "--image_size", "64",
              "--videos_per_task", "0", "--record_actions", "true"]
    local = eval_main(["--policy", res.output_dir, "--output_dir", str(tmp_path / "local"), *common])
    with running_server(create_app(Policy.from_pretrained(res.output_dir))) as url:
        remote = eval_main(["--policy_server", url, "--output_dir", str(tmp_path / "remote"), *common])
        threaded = eval_main(["--policy_server", url, "--output_dir", str(tmp_path / "async"), "--chunk_threshold",
                              "0.5", "--encoding", "json", *common])
    (a,), (b,) = local["tasks"], remote["tasks"]
    assert a["successes"] == b["successes"] and a["lengths"] == b["lengths"] and a["seeds"] == b["seeds"]
    np.testing.assert_allclose(np.asarray(a["actions"]), np.asarray(b["actions"]), atol=1e-4)
    assert remote["client"]["chunks"] == sum((n + 1) // 2 for n in b["lengths"])  # 2 actions per synchronous chunk
    (c,) = threaded["tasks"]
    assert c["episodes"] == 2 and c["control_hz"] > 0 and threaded["client"]["background_chunks"] > 0


def test_action_dim_mismatch_stops_before_the_first_episode(metaworld_env, tmp_path, capsys):
    """A 7-dim (CALVIN-style) policy on Meta-World's 4-dim actions: one line naming both, exit 2 -- not
    Meta-World's 'Actions should be size 4' from inside the first step (issue 13)."""
    from vltune.cli import main as cli_main
    from vltune.recipes.vla import main as vla_main
    from vltune.vla.data.synthetic import make_dataset

    data = make_dataset(str(tmp_path / "calvin"), fmt="calvin", n_train=4, n_val=2, state_dim=2)
    res = vla_main(["--dataset", data, "--tiny_size", "xs", "--output_dir", str(tmp_path / "p7"), "--max_steps", "1",
                    "--report_to", "none", "--save_strategy", "no", "--image_size", "64", "--train_type", "frozen"])
    assert res.config.action_dim == 7
    rc = cli_main(["eval", "vla", "--policy", res.output_dir, "--output_dir", str(tmp_path / "eval"),
                   "--tasks", "reach-v3", "--episodes", "1", "--max_episode_steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert "outputs 7-dim actions" in err[-1] and "takes 4" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "eval" / "eval_report.json").exists()


def test_several_cameras_and_a_privileged_state_are_explicit(metaworld_env, tmp_path, capsys):
    """Demos with two cameras and the goal position in the state (issue 17): a policy that reads both cameras
    and only proprio is evaluated as such; one that reads the goal is reported PRIVILEGED; GIFs show every
    camera side by side; asking for a state the policy cannot read is one line, exit 2."""
    from PIL import Image

    from vltune.cli import main as cli_main
    from vltune.recipes.eval_vla import main as eval_main
    from vltune.recipes.vla import main as vla_main
    from vltune.vla.data import read_episodes
    from vltune.vla.data.metaworld_demos import record_demos

    data = tmp_path / "mw2"
    meta = record_demos(["reach-v3"], str(data), episodes=2, val_episodes=0, image_size=64, hold_steps=0,
                        cameras=("topview", "corner"), state="proprio+goal")
    assert meta["cameras"] == ["topview", "corner"] and meta["privileged_state"]
    ep = read_episodes(str(data))[0]
    assert sorted(ep.images) == ["corner", "topview"] and ep.state.shape[1] == 7
    obs = metaworld_env.reset(0)
    np.testing.assert_allclose(ep.state[0], np.r_[obs[:4], obs[36:39]], atol=1e-6)  # demo seed 0's first frame

    def policy(name, *extra):
        return vla_main(["--dataset", str(data), "--tiny_size", "xs", "--output_dir", str(tmp_path / name),
                         "--max_steps", "1", "--report_to", "none", "--save_strategy", "no", "--image_size", "64",
                         "--window_size", "1", *extra]).output_dir

    honest = policy("honest", "--cameras", "topview,corner", "--state_dims", "0,1,2,3")
    privileged = policy("privileged", "--cameras", "corner")
    common = ["--tasks", "reach-v3", "--episodes", "2", "--max_episode_steps", "4", "--image_size", "64"]
    report = eval_main(["--policy", honest, "--output_dir", str(tmp_path / "e1"), *common])
    assert report["cameras"] == ["topview", "corner"] and report["state"] == "proprio"
    assert not report["privileged_state"]
    gifs = sorted((tmp_path / "e1" / "videos").glob("*.gif"))
    assert [g.name for g in gifs] == ["reach-v3_ep00_fail.gif"]  # 4 steps: no success; one GIF per outcome
    assert Image.open(gifs[0]).size == (128, 64)  # both cameras side by side
    report = eval_main(["--policy", privileged, "--output_dir", str(tmp_path / "e2"), *common])
    assert report["cameras"] == ["corner"] and report["state"] == "proprio+goal" and report["privileged_state"]
    assert "PRIVILEGED" in (tmp_path / "e2" / "eval_report.md").read_text()

    capsys.readouterr()
    rc = cli_main(["eval", "vla", "--policy", privileged, "--output_dir", str(tmp_path / "e3"), "--state", "proprio",
                   *common])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--state proprio: 4 values, the policy reads 7" in err[-1]
    assert not (tmp_path / "e3" / "eval_report.json").exists()
    # a misspelt task or camera: one line naming the flag and the right names, exit 2, nothing written
    rc = cli_main(["eval", "vla", "--policy", honest, "--output_dir", str(tmp_path / "e4"), *common[2:],
                   "--tasks", "reach,drawer-close-v3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "'reach' is not a Meta-World v3 task (did you mean reach-v3?)" in err[-1]
    rc = cli_main(["eval", "vla", "--policy", honest, "--output_dir", str(tmp_path / "e4"), *common,
                   "--cameras", "topview,corners"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "reach-v3 has no camera corners; its cameras are" in err[-1] and "corner," in err[-1]
    assert not (tmp_path / "e4" / "eval_report.json").exists()
    # --cameras auto (the default) with a policy camera Meta-World lacks: the error says where the name came from
    import shutil

    renamed = tmp_path / "renamed"
    shutil.copytree(privileged, renamed)
    config = json.loads((renamed / "policy_config.json").read_text())
    (renamed / "policy_config.json").write_text(json.dumps({**config, "cameras": ["wrist"]}))
    rc = cli_main(["eval", "vla", "--policy", str(renamed), "--output_dir", str(tmp_path / "e5"), *common])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--cameras auto (the policy's cameras wrist -> Meta-World's wrist;" in err[-1]
    assert "reach-v3 has no camera wrist; its cameras are" in err[-1]
    from vltune.vla.data.metaworld_demos import main as demos_main

    with pytest.raises(SystemExit) as stop:
        demos_main(["--tasks", "mt10", "--cameras", "top", "--out", str(tmp_path / "d")])
    assert stop.value.code == 2 and "has no camera top" in capsys.readouterr().err
    from vltune.vla.metaworld_env import MT10, parse_tasks

    assert parse_tasks("mt10") == list(MT10) and len(parse_tasks("MT50")) == 50 and set(MT10) <= set(parse_tasks("mt50"))


def test_mt10_benchmark_smoke(metaworld_env, tmp_path):
    """benchmarks/vla_mt10.sh at smoke size (2 tasks, 3 demos, 20 steps, 2 episodes): the rows train, evaluate
    and land in one results table with every task's rate, the state each row read and the script's times."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "SMOKE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "vla_mt10.sh"), str(tmp_path / "w")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    assert [r["name"] for r in res["rows"]] == ["images", "no_images"]
    for r in res["rows"]:
        assert set(r["success"]) == {"reach-v3", "drawer-close-v3"} and r["state"] == "proprio"
        assert not r["privileged_state"] and r["train_seconds"] > 0 and r["eval_seconds"] > 0
    assert res["rows"][0]["cameras"] == ["corner"] and res["rows"][1]["cameras"] == []
    assert {"demos", "train_images", "eval_images", "train_no_images", "eval_no_images"} <= set(res["times_s"])
    assert 0 < res["wall_s"] <= res["steps_sum_s"] + 60  # the two rows ran side by side
    md = (tmp_path / "w" / "results.md").read_text()
    assert "| reach | drawer-close | mean |" in md and "no images" in md
    assert list((tmp_path / "w" / "images" / "eval" / "videos").glob("reach-v3_ep*_*.gif"))
    # the demos' directory names the image size, so a run at another SIZE records its own
    assert [p.name for p in (tmp_path / "w").glob("demos_*")] == ["demos_corner_64px"]
    # ONLY= adds a row to the finished run on the same demos (not recorded again); a name of no row is exit 2
    proc = subprocess.run(["bash", str(root / "benchmarks" / "vla_mt10.sh"), str(tmp_path / "w")], cwd=root,
                          env={**env, "ONLY": "privileged_goal", "PRIVILEGED": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    assert [(r["name"], r["state"], r["privileged_state"]) for r in res["rows"]] == [
        ("privileged_goal", "proprio+goal", True)]
    assert (tmp_path / "w" / "times.txt").read_text().count("demos ") == 1
    assert "(PRIVILEGED)" in (tmp_path / "w" / "results.md").read_text()
    # a name of no row stops before any demo is recorded (here: in a new workdir)
    proc = subprocess.run(["bash", str(root / "benchmarks" / "vla_mt10.sh"), str(tmp_path / "w2")], cwd=root,
                          env={**env, "ONLY": "images,chunk3"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "ONLY=images,chunk3 names no row of this run (chunk3)" in proc.stderr
    assert not list((tmp_path / "w2").glob("demos_*"))
