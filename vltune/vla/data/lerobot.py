"""LeRobotDataset v3.0 layout (LeRobot, GR00T, openpi conversions): parquet tables + one mp4 per camera.

    meta/info.json  meta/stats.json  meta/tasks.parquet  meta/episodes/chunk-000/file-000.parquet
    data/chunk-000/file-000.parquet                 many episodes per file
    videos/<video_key>/chunk-000/file-000.mp4       episodes back to back; frame at from_timestamp + timestamp

Features read: `action`, `observation.state` (optional), `observation.images.*` (video or image dtype).
Each camera is named by its key: `observation.images.top` is camera "top" (`observation.image` is "image"),
and an episode's camera "corner" is written as `observation.images.corner`. Videos are decoded with PyAV (`pip install av`). A non-"training" split is written
to / read from `<root>/<split>/` as a dataset of its own (LeRobot itself has no splits).
v2.x datasets (meta/episodes.jsonl, one file per episode) are recognised and refused with a clear message.
"""

from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path

import numpy as np

from .episodes import Episode

logger = logging.getLogger("vltune")
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
IMAGE_PREFIX = "observation.images."


def camera_key(camera: str) -> str:
    return IMAGE_PREFIX + camera


def _require_av():
    try:
        import av
    except ImportError as e:
        raise ImportError("LeRobot videos need PyAV: pip install av (or the vla extra: pip install -e '.[vla]')") from e
    return av


def _split_root(path: str, split: str | None) -> Path:
    return Path(path) if split in (None, "", "training") else Path(path) / split


# ---------------------------------------------------------------------------- video
def encode_video(frames: np.ndarray, path: Path, fps: int, codec: str = "libx264", crf: int = 18) -> None:
    av = _require_av()
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1:3]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        stream.options = {"crf": str(crf), "g": "2"}  # short GOP: cheap seeking to an episode
        for f in frames:
            if f.shape[0] % 2 or f.shape[1] % 2:
                f = np.pad(f, ((0, f.shape[0] % 2), (0, f.shape[1] % 2), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def decode_video(path: Path, height: int, width: int) -> np.ndarray:
    av = _require_av()
    if not path.exists():
        raise FileNotFoundError(f"{path}: video file listed in meta/episodes is missing")
    with av.open(str(path)) as f:
        frames = [fr.to_ndarray(format="rgb24")[:height, :width] for fr in f.decode(video=0)]
    return np.stack(frames)


# ---------------------------------------------------------------------------- write
def write(episodes: list[Episode], path: str, split: str = "training", fps: int = 10,
          robot_type: str = "unknown") -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = _split_root(path, split)
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
    (root / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(ep.instruction for ep in episodes))
    first = episodes[0]
    a_dim = first.actions.shape[1]
    cams = list(first.images)
    features = {"action": {"dtype": "float32", "shape": [a_dim], "names": [f"a{i}" for i in range(a_dim)]}}
    if first.state is not None:
        s_dim = first.state.shape[1]
        features["observation.state"] = {"dtype": "float32", "shape": [s_dim], "names": [f"s{i}" for i in range(s_dim)]}
    for c in cams:
        h, w = first.images[c].shape[1:3]
        features[camera_key(c)] = {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                                  "info": {"video.height": h, "video.width": w, "video.codec": "h264",
                                           "video.pix_fmt": "yuv420p", "video.fps": fps}}
    for k in ("timestamp",):
        features[k] = {"dtype": "float32", "shape": [1], "names": None}
    for k in ("frame_index", "episode_index", "index", "task_index"):
        features[k] = {"dtype": "int64", "shape": [1], "names": None}

    cols: dict[str, list] = {k: [] for k in ("action", "observation.state", "timestamp", "frame_index",
                                             "episode_index", "index", "task_index")}
    ep_rows: dict[str, list] = {k: [] for k in ("episode_index", "tasks", "length", "data/chunk_index",
                                                "data/file_index", "dataset_from_index", "dataset_to_index")}
    for c in cams:
        for k in ("chunk_index", "file_index", "from_timestamp", "to_timestamp"):
            ep_rows[f"videos/{camera_key(c)}/{k}"] = []
    index = 0
    for e, ep in enumerate(episodes):
        n = len(ep)
        cols["action"] += [r.tolist() for r in ep.actions]
        if ep.state is not None:
            cols["observation.state"] += [r.tolist() for r in ep.state]
        cols["timestamp"] += [t / fps for t in range(n)]
        cols["frame_index"] += list(range(n))
        cols["episode_index"] += [e] * n
        cols["index"] += list(range(index, index + n))
        cols["task_index"] += [tasks.index(ep.instruction)] * n
        for k, v in (("episode_index", e), ("tasks", [ep.instruction]), ("length", n), ("data/chunk_index", 0),
                     ("data/file_index", 0), ("dataset_from_index", index), ("dataset_to_index", index + n)):
            ep_rows[k].append(v)
        for c in cams:
            key = camera_key(c)
            for k, v in (("chunk_index", 0), ("file_index", 0), ("from_timestamp", index / fps),
                         ("to_timestamp", (index + n) / fps)):
                ep_rows[f"videos/{key}/{k}"].append(v)
        index += n
    if first.state is None:
        del cols["observation.state"]
    table = pa.table({k: (pa.array(v, pa.list_(pa.float32())) if k in ("action", "observation.state")
                          else pa.array(v, pa.float32() if k == "timestamp" else pa.int64())) for k, v in cols.items()})
    pq.write_table(table, root / DATA_PATH.format(chunk_index=0, file_index=0))
    pq.write_table(pa.table(ep_rows), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.table({"task_index": list(range(len(tasks))), "task": tasks}), root / "meta" / "tasks.parquet")
    for c in cams:
        frames = np.concatenate([ep.images[c] for ep in episodes])
        encode_video(frames, root / VIDEO_PATH.format(video_key=camera_key(c), chunk_index=0, file_index=0), fps)
    stats = {}
    for k in ("action", "observation.state"):
        if k in cols:
            x = np.asarray(cols[k], np.float64)
            stats[k] = {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
                        "std": x.std(0).tolist(), "count": [len(x)],
                        "q01": np.quantile(x, 0.01, 0).tolist(), "q99": np.quantile(x, 0.99, 0).tolist()}
    (root / "meta" / "stats.json").write_text(json.dumps(stats, indent=1))
    info = {"codebase_version": "v3.0", "robot_type": robot_type, "fps": fps, "total_episodes": len(episodes),
            "total_frames": index, "total_tasks": len(tasks), "chunks_size": 1000, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 500, "splits": {"train": f"0:{len(episodes)}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if cams else None, "features": features}
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    return str(root)


# ---------------------------------------------------------------------------- read
def _cameras(features: dict) -> dict[str, str]:
    """{camera name: feature key} for every image or video feature (observation.images.<name>, observation.image)."""
    keys = [k for k, v in features.items() if k.startswith("observation.image") and v.get("dtype") in ("video", "image")]
    return {(k[len(IMAGE_PREFIX):] if k.startswith(IMAGE_PREFIX) else k.split(".")[-1]).replace(".", "_"): k
            for k in keys}


def read(path: str, split: str = "training", max_episodes: int | None = None, **_) -> list[Episode]:
    import pyarrow.parquet as pq

    root = _split_root(path, split)
    info_file = root / "meta" / "info.json"
    if not info_file.exists():
        if (root / "meta" / "episodes.jsonl").exists():
            raise ValueError(f"{root}: a LeRobotDataset v2.x (meta/episodes.jsonl); convert it to v3.0 with LeRobot's "
                             "`python -m lerobot.datasets.v30.convert_dataset_v21_to_v30` first")
        raise FileNotFoundError(f"{info_file} not found: not a LeRobotDataset v3.0 directory")
    info = json.loads(info_file.read_text())
    if not str(info.get("codebase_version", "")).startswith("v3"):
        raise ValueError(f"{info_file}: codebase_version {info.get('codebase_version')!r}; only v3.x is read")
    features = info["features"]
    if "action" not in features:
        raise ValueError(f"{info_file}: no 'action' feature (features: {', '.join(features)})")
    fps = float(info["fps"])
    eps = pq.read_table(sorted((root / "meta" / "episodes").rglob("*.parquet"))).to_pylist()
    eps.sort(key=lambda r: r["episode_index"])
    eps = eps[:max_episodes]
    tasks = {}
    if (root / "meta" / "tasks.parquet").exists():
        t = pq.read_table(root / "meta" / "tasks.parquet").to_pydict()
        names = t.get("task") or t.get("__index_level_0__") or []
        tasks = dict(zip(t["task_index"], names))
    cameras = _cameras(features)
    data_cache: dict[str, dict] = {}
    video_cache: dict[str, np.ndarray] = {}
    episodes = []
    for ep in eps:
        e = ep["episode_index"]
        rel = info["data_path"].format(chunk_index=ep["data/chunk_index"], file_index=ep["data/file_index"])
        if rel not in data_cache:
            f = root / rel
            if not f.exists():
                raise FileNotFoundError(f"{f}: data file of episode {e} is missing")
            data_cache[rel] = pq.read_table(f).to_pydict()
        d = data_cache[rel]
        rows = [i for i, x in enumerate(d["episode_index"]) if x == e]
        if not rows:
            raise ValueError(f"{root / rel}: no rows for episode {e} listed in meta/episodes")
        rows.sort(key=lambda i: d["frame_index"][i])
        actions = np.asarray([d["action"][i] for i in rows], np.float32)
        state = (np.asarray([d["observation.state"][i] for i in rows], np.float32)
                 if "observation.state" in d else None)
        images = {}
        for cam, key in cameras.items():
            if features[key]["dtype"] == "image":
                from io import BytesIO

                from PIL import Image

                images[cam] = np.stack([np.asarray(Image.open(BytesIO(d[key][i]["bytes"])).convert("RGB"))
                                         for i in rows])
                continue
            vrel = info["video_path"].format(video_key=key, chunk_index=ep[f"videos/{key}/chunk_index"],
                                             file_index=ep[f"videos/{key}/file_index"])
            h, w = features[key]["shape"][:2] if features[key].get("names", [None])[0] != "channels" else \
                features[key]["shape"][1:3]
            if vrel not in video_cache:
                video_cache[vrel] = decode_video(root / vrel, h, w)
            frames = video_cache[vrel]
            start = int(round((ep[f"videos/{key}/from_timestamp"] + d["timestamp"][rows[0]]) * fps))
            if start + len(rows) > len(frames):
                raise ValueError(f"{root / vrel}: episode {e} needs frames {start}-{start + len(rows) - 1}, the video "
                                 f"has {len(frames)} (timestamps or fps in meta/info.json inconsistent?)")
            images[cam] = frames[start:start + len(rows)]
        instruction = tasks.get(d["task_index"][rows[0]], "") if "task_index" in d else ""
        if not instruction and ep.get("tasks"):
            instruction = ep["tasks"][0]
        episodes.append(Episode(instruction=instruction, task=instruction, actions=actions, images=images,
                                state=state, source=f"{root} episode {e}"))
    return episodes
