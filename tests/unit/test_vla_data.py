"""Robot data: CALVIN and LeRobot v3 writers/readers round-trip; the CALVIN pack; clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vltune.errors import UsageError
from vltune.vla.data import detect_format, read_episodes, write_episodes
from vltune.vla.data.synthetic import make_episodes


def _same(a, b, image_tol=0.0):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.instruction == y.instruction
        np.testing.assert_array_equal(x.actions, y.actions)
        np.testing.assert_array_equal(x.state, y.state)
        assert sorted(x.images) == sorted(y.images)
        for cam in x.images:
            diff = np.abs(x.images[cam].astype(float) - y.images[cam]).mean()
            assert diff <= image_tol, f"{cam}: mean abs pixel difference {diff}"


def test_calvin_round_trip_with_language_windows_and_pack(tmp_path):
    eps = make_episodes(5, length=7, action_dim=7, gripper_dims=[6], wrist_camera=True, state_dim=15)
    write_episodes(eps, str(tmp_path / "task_debug"), fmt="calvin", split="training")
    root = tmp_path / "task_debug" / "training"
    assert detect_format(str(tmp_path / "task_debug")) == "calvin"
    ids = np.load(root / "ep_start_end_ids.npy")
    assert ids.tolist() == [[7 * i, 7 * i + 6] for i in range(5)]
    lang = np.load(root / "lang_annotations" / "auto_lang_ann.npy", allow_pickle=True).item()
    assert lang["language"]["ann"][0] == eps[0].instruction and lang["info"]["indx"][1] == (7, 13)
    with np.load(root / "episode_0000003.npz") as z:
        assert z["rgb_static"].shape == (64, 64, 3) and z["rgb_gripper"].dtype == np.uint8
        assert z["rel_actions"].shape == (7,) and z["robot_obs"].shape == (15,)
    _same(read_episodes(str(tmp_path / "task_debug")), eps)
    # The second read comes from the packed cache: it no longer opens a single per-frame file.
    for f in root.glob("episode_*.npz"):
        f.unlink()
    _same(read_episodes(str(tmp_path / "task_debug")), eps)


def test_calvin_missing_frame_names_the_file(tmp_path):
    write_episodes(make_episodes(2, length=4, state_dim=2), str(tmp_path / "d"), fmt="calvin")
    (tmp_path / "d" / "training" / "episode_0000005.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"episode_0000005\.npz: frame 5"):
        read_episodes(str(tmp_path / "d"))


def test_calvin_wrong_action_key_says_how_to_fix(tmp_path):
    write_episodes(make_episodes(1, length=3, state_dim=2), str(tmp_path / "d"), fmt="calvin")
    with pytest.raises(KeyError, match="--action_key"):
        read_episodes(str(tmp_path / "d"), action_key="abs_actions")


def test_lerobot_v3_round_trip(tmp_path):
    eps = make_episodes(4, length=6, action_dim=14, gripper_dims=[6, 13], wrist_camera=True, state_dim=3)
    out = tmp_path / "lr"
    write_episodes(eps, str(out), fmt="lerobot")
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 4 and info["total_frames"] == 24
    assert info["features"]["observation.images.static"]["dtype"] == "video"
    assert (out / "videos" / "observation.images.gripper" / "chunk-000" / "file-000.mp4").exists()
    import pyarrow.parquet as pq

    ep_table = pq.read_table(out / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pydict()
    assert ep_table["dataset_from_index"] == [0, 6, 12, 18]
    assert detect_format(str(out)) == "lerobot"
    _same(read_episodes(str(out)), eps, image_tol=4.0)  # mp4 is lossy; actions and state are exact


def test_lerobot_v2_is_refused_clearly(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "episodes.jsonl").write_text("{}\n")
    from vltune.vla.data.lerobot import read

    with pytest.raises(ValueError, match="v2.x"):
        read(str(tmp_path))


def test_unknown_layout_is_named(tmp_path):
    from vltune.errors import UsageError

    with pytest.raises(UsageError, match="not a CALVIN directory"):  # the user's mistake: one line, exit 2
        detect_format(str(tmp_path))


def _named_cameras(episodes, names=("topview", "corner", "gripperPOV")):
    """The synthetic episodes with their two cameras renamed and a third one added (Meta-World's names)."""
    for ep in episodes:
        static, wrist = ep.images.pop("static"), ep.images.pop("gripper")
        ep.images.update({names[0]: static, names[1]: wrist, names[2]: 255 - static})
    return episodes


@pytest.mark.parametrize("fmt", ["calvin", "lerobot"])
def test_any_number_of_named_cameras_round_trips(tmp_path, fmt):
    eps = _named_cameras(make_episodes(3, length=5, action_dim=4, wrist_camera=True, state_dim=7))
    write_episodes(eps, str(tmp_path / "d"), fmt=fmt)
    if fmt == "calvin":
        with np.load(tmp_path / "d" / "training" / "episode_0000002.npz") as z:
            assert {"rgb_topview", "rgb_corner", "rgb_gripperPOV"} <= set(z.files)
    else:
        info = json.loads((tmp_path / "d" / "meta" / "info.json").read_text())
        assert {"observation.images.topview", "observation.images.corner", "observation.images.gripperPOV"} \
            <= set(info["features"])
    back = read_episodes(str(tmp_path / "d"))
    assert sorted(back[0].images) == ["corner", "gripperPOV", "topview"]
    _same(back, eps, image_tol=0.0 if fmt == "calvin" else 4.0)


def test_calvin_tactile_images_are_not_a_camera(tmp_path):
    """Real CALVIN frames carry rgb_tactile (H, W, 6): it must not be read as a camera."""
    write_episodes(make_episodes(1, length=3, state_dim=2), str(tmp_path / "d"), fmt="calvin")
    for f in (tmp_path / "d" / "training").glob("episode_*.npz"):
        with np.load(f) as z:
            frame = dict(z)
        np.savez(f, **frame, rgb_tactile=np.zeros((16, 12, 6), np.uint8))
    assert sorted(read_episodes(str(tmp_path / "d"))[0].images) == ["static"]


def test_a_camera_name_that_cannot_be_a_file_name_is_refused():
    from vltune.vla.data.episodes import Episode

    with pytest.raises(ValueError, match="camera name 'top view'"):
        Episode(instruction="x", actions=np.zeros((2, 4)), images={"top view": np.zeros((2, 8, 8, 3), np.uint8)})


class _FakeEnv:
    """Stands in for MetaWorldEnv in record_demos: what the recorder reads of it, nothing rendered."""

    instruction, task, cameras = "reach the goal", "reach-v3", ("corner",)

    def __init__(self, task, cameras, image_size):
        pass

    def close(self):
        pass


def _scheduled_expert(fail_every: int):
    """A record_episode stand-in whose expert fails every `fail_every`-th try (an expert that is right 7 times in 8,
    like peg-insert-side's with action noise)."""
    from vltune.vla.data.episodes import Episode

    def record(env, expert, seed, max_steps, action_noise, hold_steps, rng, state="proprio"):
        ep = Episode(instruction=env.instruction, task=env.task, actions=np.zeros((3, 4), np.float32),
                     images={"corner": np.zeros((3, 8, 8, 3), np.uint8)}, state=np.zeros((3, 4), np.float32),
                     source=f"seed {seed}")
        return ep, (seed + 1) % fail_every != 0, np.zeros(3)

    return record


def test_demo_failures_are_counted_per_task_not_against_the_validation_split(tmp_path, monkeypatch):
    """100 training + 3 validation episodes from an expert that fails one try in eight: 14 failures in all. The old
    limit (the split's size + 10) stopped the run in the 3-episode validation split and wrote nothing."""
    import vltune.vla.data.metaworld_demos as md

    monkeypatch.setattr(md, "MetaWorldEnv", _FakeEnv)
    monkeypatch.setattr(md, "expert_policy", lambda task: None)
    monkeypatch.setattr(md, "record_episode", _scheduled_expert(8))
    meta = md.record_demos(["reach-v3"], str(tmp_path / "d"), episodes=100, val_episodes=3, cameras=("corner",))
    info = meta["per_task"]["reach-v3"]
    assert len(info["training_seeds"]) == 100 and len(info["validation_seeds"]) == 3
    assert len(info["failed_seeds"]) == 14
    # an expert that fails most tries still stops, naming the task and the flags that help, once its failures
    # exceed the episodes asked for
    monkeypatch.setattr(md, "record_episode", _scheduled_expert(1))
    with pytest.raises(UsageError, match=r"reach-v3: the scripted expert failed 14 of 14 tries, more than the 13 "
                                         r"allowed .*lower --action_noise \(now 0.1\) or raise --max_steps"):
        md.record_demos(["reach-v3"], str(tmp_path / "e"), episodes=2, val_episodes=1, cameras=("corner",))


class _NamedFakeEnv(_FakeEnv):
    def __init__(self, task, cameras, image_size):
        self.task, self.instruction = task, f"solve {task}"


def _noisy_expert(calls: list, stop_at: str | None = None):
    """A record_episode stand-in whose episodes are drawn from the recorder's noise generator (as the executed
    actions are), so a resumed recording matches an uninterrupted one only if the generator is restored too.
    With `stop_at`, the first try of that task is interrupted as Ctrl-C would."""
    from vltune.vla.data.episodes import Episode

    def record(env, expert, seed, max_steps, action_noise, hold_steps, rng, state="proprio"):
        if env.task == stop_at:
            raise KeyboardInterrupt
        calls.append(env.task)
        n = 2 + seed % 3
        ep = Episode(instruction=env.instruction, task=env.task, actions=rng.normal(size=(n, 4)).astype(np.float32),
                     images={"corner": rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)},
                     state=np.zeros((n, 4), np.float32), source=f"{env.task} seed {seed}")
        return ep, seed % 5 != 4, np.full(3, seed, float)

    return record


def test_a_stopped_demo_recording_resumes_after_its_last_finished_task(tmp_path, monkeypatch):
    """Ctrl-C (or a crash) in the third task keeps the two finished ones; the same command then records only the
    rest and writes the data set an uninterrupted run writes. Other settings start over."""
    import vltune.vla.data.metaworld_demos as md

    monkeypatch.setattr(md, "MetaWorldEnv", _NamedFakeEnv)
    monkeypatch.setattr(md, "expert_policy", lambda task: None)
    tasks, kw = ["reach-v3", "push-v3", "door-open-v3"], dict(episodes=4, val_episodes=1, cameras=("corner",))
    whole = []
    monkeypatch.setattr(md, "record_episode", _noisy_expert(whole))
    ref = md.record_demos(tasks, str(tmp_path / "ref"), **kw)

    out, first = tmp_path / "out", []
    monkeypatch.setattr(md, "record_episode", _noisy_expert(first, stop_at="door-open-v3"))
    with pytest.raises(KeyboardInterrupt):
        md.record_demos(tasks, str(out), **kw)
    assert sorted(p.name for p in (out / md.PARTIAL_DIR).iterdir()) == ["push-v3.pkl", "reach-v3.pkl",
                                                                         "settings.json"]
    assert not (out / "metaworld_demos.json").exists()
    second = []
    monkeypatch.setattr(md, "record_episode", _noisy_expert(second))
    meta = md.record_demos(tasks, str(out), **kw)
    assert set(second) == {"door-open-v3"} and len(first) + len(second) == len(whole)
    assert meta["per_task"] == ref["per_task"]
    assert not (out / md.PARTIAL_DIR).exists()
    for split in ("training", "validation"):
        got, want = read_episodes(str(out), split=split), read_episodes(str(tmp_path / "ref"), split=split)
        assert [e.instruction for e in got] == [e.instruction for e in want]
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.actions, b.actions)
            np.testing.assert_array_equal(a.images["corner"], b.images["corner"])

    # a stopped recording under other settings is not mixed in: this one records every task again
    monkeypatch.setattr(md, "record_episode", _noisy_expert([], stop_at="push-v3"))
    with pytest.raises(KeyboardInterrupt):
        md.record_demos(tasks, str(tmp_path / "other"), **kw)
    again = []
    monkeypatch.setattr(md, "record_episode", _noisy_expert(again))
    md.record_demos(tasks, str(tmp_path / "other"), **{**kw, "action_noise": 0.05})
    assert set(again) == set(tasks)
