"""CALVIN layout (what RoboVLMs' DiskCalvinDataset reads): one npz per frame + language windows.

    <split>/episode_0000123.npz     rgb_static (H,W,3) u8, rgb_gripper, rel_actions (7,), actions, robot_obs ...
                                    (every rgb_<name> key is a camera: rgb_topview -> camera "topview")
    <split>/ep_start_end_ids.npy    (N, 2) [start, end], end inclusive
    <split>/lang_annotations/auto_lang_ann.npy   {"language": {"ann", "task", "emb"}, "info": {"indx"}}

One file per frame is the known bottleneck (formats.md: 20-40 % GPU utilisation). `read` loads every
needed frame once, in parallel, and packs each key into one .npy under the cache directory
($VLTUNE_CACHE/vla_pack); later reads memory-map the pack, so a training step never opens an npz.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .episodes import Episode

logger = logging.getLogger("vltune")
IMAGE_PREFIX = "rgb_"  # rgb_<camera>: CALVIN's rgb_static / rgb_gripper, and any other named camera
PACK_VERSION = 2  # 2: cameras packed as rgb_<camera>.npy, any camera name


def _frame_file(root: Path, idx: int) -> Path:
    return root / f"episode_{idx:07d}.npz"


def _split_root(path: str, split: str) -> Path:
    p = Path(path)
    if (p / "ep_start_end_ids.npy").exists():
        return p
    if (p / split / "ep_start_end_ids.npy").exists():
        return p / split
    raise FileNotFoundError(f"{path}: no ep_start_end_ids.npy here nor in {split}/ -- is this a CALVIN "
                            f"task_*/ directory? (expected <dir>/{split}/ep_start_end_ids.npy)")


# ---------------------------------------------------------------------------- write
def write(episodes: list[Episode], path: str, split: str = "training", start_index: int = 0) -> str:
    """Write episodes in the CALVIN layout (one npz per frame, a language window per episode).

    `actions` and `rel_actions` both hold the episode's actions (we do not know absolute poses), `robot_obs`
    the state when there is one. Returns the split directory.
    """
    root = Path(path) / split
    (root / "lang_annotations").mkdir(parents=True, exist_ok=True)
    ids, anns, tasks = [], [], []
    idx = start_index
    for ep in episodes:
        start = idx
        for t in range(len(ep)):
            frame = {"rel_actions": ep.actions[t], "actions": ep.actions[t]}
            for cam, frames in ep.images.items():
                frame[IMAGE_PREFIX + cam] = frames[t]
            if ep.state is not None:
                frame["robot_obs"] = ep.state[t]
            np.savez(_frame_file(root, idx), **frame)
            idx += 1
        ids.append((start, idx - 1))
        anns.append(ep.instruction)
        tasks.append(ep.task or ep.instruction)
    ids_arr = np.asarray(ids, dtype=np.int64)
    np.save(root / "ep_start_end_ids.npy", ids_arr)
    np.save(root / "ep_lens.npy", ids_arr[:, 1] - ids_arr[:, 0] + 1)
    lang = {"language": {"ann": anns, "task": tasks, "emb": np.zeros((len(anns), 1, 384), np.float32)},
            "info": {"indx": [tuple(map(int, r)) for r in ids]}}
    np.save(root / "lang_annotations" / "auto_lang_ann.npy", lang, allow_pickle=True)
    return str(root)


# ---------------------------------------------------------------------------- read
def _windows(root: Path, use_language: bool) -> list[tuple[int, int, str, str]]:
    """[(start, end inclusive, instruction, task)]: language windows, or whole episodes without language."""
    ann_file = root / "lang_annotations" / "auto_lang_ann.npy"
    if use_language and ann_file.exists():
        lang = np.load(ann_file, allow_pickle=True).item()
        try:
            indx, ann = lang["info"]["indx"], lang["language"]["ann"]
            task = lang["language"].get("task", ann)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{ann_file}: expected {{'language': {{'ann': [...], 'task': [...]}}, "
                             f"'info': {{'indx': [(start, end), ...]}}}} (missing {e})") from e
        if len(indx) != len(ann):
            raise ValueError(f"{ann_file}: {len(indx)} windows in info.indx but {len(ann)} language.ann entries")
        return [(int(s), int(e), str(a), str(t)) for (s, e), a, t in zip(indx, ann, task)]
    if use_language:
        logger.warning("[data] %s has no lang_annotations/auto_lang_ann.npy: training on whole episodes with an "
                       "empty instruction", root)
    ids = np.load(root / "ep_start_end_ids.npy")
    return [(int(s), int(e), "", "") for s, e in ids]


def _pack_dir(root: Path, action_key: str, frames: np.ndarray) -> Path:
    stat = (root / "ep_start_end_ids.npy").stat()
    key = json.dumps([str(root.resolve()), action_key, int(frames[0]), int(frames[-1]), len(frames),
                      stat.st_mtime_ns, PACK_VERSION])
    base = Path(os.environ.get("VLTUNE_CACHE", Path.home() / ".cache" / "vltune")) / "vla_pack"
    return base / hashlib.sha1(key.encode()).hexdigest()[:16]


def _load_frame(root: Path, idx: int, action_key: str) -> dict:
    f = _frame_file(root, idx)
    if not f.exists():
        raise FileNotFoundError(f"{f}: frame {idx} is listed in ep_start_end_ids.npy / the language windows but "
                                f"its file is missing (incomplete download or copy?)")
    with np.load(f) as z:
        if action_key not in z:
            raise KeyError(f"{f} (frame {idx}): no {action_key!r} array (keys: {', '.join(z.files)}); "
                           f"choose another with --action_key (rel_actions | actions)")
        out = {"actions": z[action_key].astype(np.float32)}
        for key in z.files:
            if key.startswith(IMAGE_PREFIX):
                img = z[key]
                if img.ndim == 3 and img.shape[-1] == 3:  # CALVIN's rgb_tactile (H, W, 6) is no camera
                    out[key] = img
        if "robot_obs" in z:
            out["state"] = z["robot_obs"].astype(np.float32)
    return out


def _pack(root: Path, frames: np.ndarray, action_key: str, out: Path, workers: int = 8) -> None:
    logger.info("[data] packing %d CALVIN frames of %s into %s (once; later reads memory-map it)",
                len(frames), root, out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    first = _load_frame(root, int(frames[0]), action_key)
    arrays = {k: np.lib.format.open_memmap(tmp / f"{k}.npy", mode="w+", dtype=v.dtype, shape=(len(frames), *v.shape))
              for k, v in first.items()}

    def load(i: int) -> None:
        d = _load_frame(root, int(frames[i]), action_key)
        for k, arr in arrays.items():
            if k not in d or d[k].shape != arr.shape[1:]:
                raise ValueError(f"{_frame_file(root, int(frames[i]))} (frame {frames[i]}): {k} "
                                 f"{'missing' if k not in d else d[k].shape}, frame {frames[0]} has {arr.shape[1:]}")
            arr[i] = d[k]

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(load, range(len(frames))))
    for arr in arrays.values():
        arr.flush()
    np.save(tmp / "frames.npy", frames)
    try:
        tmp.rename(out)
    except OSError:  # another process packed it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def read(path: str, split: str = "training", action_key: str = "rel_actions", use_language: bool = True,
         max_episodes: int | None = None) -> list[Episode]:
    """Episodes (one per language window) of a CALVIN split, from a packed cache built on first read."""
    root = _split_root(path, split)
    windows = _windows(root, use_language)[:max_episodes]
    if not windows:
        raise ValueError(f"{root}: no episode or language window")
    frames = np.unique(np.concatenate([np.arange(s, e + 1) for s, e, _, _ in windows]))
    pack = _pack_dir(root, action_key, frames)
    if not (pack / "frames.npy").exists():
        _pack(root, frames, action_key, pack)
    arrays = {f.stem: np.load(f, mmap_mode="r") for f in pack.glob("*.npy") if f.stem != "frames"}
    pos = {int(f): i for i, f in enumerate(np.load(pack / "frames.npy"))}
    episodes = []
    for s, e, ann, task in windows:
        a, b = pos[s], pos[e] + 1
        if b - a != e - s + 1:
            raise ValueError(f"{root}: frames {s}-{e} are not contiguous in the pack (missing frame files?)")
        episodes.append(Episode(
            instruction=ann, task=task, actions=np.asarray(arrays["actions"][a:b]),
            images={k[len(IMAGE_PREFIX):]: v[a:b] for k, v in sorted(arrays.items()) if k.startswith(IMAGE_PREFIX)},
            state=np.asarray(arrays["state"][a:b]) if "state" in arrays else None,
            source=f"{root} frames {s}-{e}"))
    return episodes
