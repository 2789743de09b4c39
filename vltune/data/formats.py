"""Readers for the data layouts users already have, all normalised to `Sample`.

Formats (detected from the file or directory; see `READERS`):
- ms-swift JSONL: {"messages": [{"role", "content": "<image>text", "loss": false?}], "images": [...]}
- ShareGPT / LLaVA JSON(L): {"conversations": [{"from": "human"|"gpt"|"system", "value"}], "images"|"image"}
- TRL content lists: messages whose content is [{"type": "image"}, {"type": "text", "text"}] (+ "images"),
  also with inline {"type": "image", "image": "path"} parts (seeds/04)
- HF `datasets`: a `save_to_disk` directory or .parquet files with the columns above
- per-user pickle directories (seeds/04): user_<id>.pkl, each a list of conversations;
  read only with `allow_pickle=True` because unpickling runs code.

Image references may be relative to the data file, absolute, base64 data URIs or URLs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..arg_checks import parse_users  # noqa: F401  (re-exported: data code reads user specs)
from .errors import DataError

IMAGE_TAG = "<image>"
ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
    "model": "assistant", "system": "system", "observation": "user", "tool": "tool",
}
KNOWN_COLUMNS = {"messages", "conversations", "images", "image", "videos", "video"}


@dataclass
class Sample:
    """One conversation in canonical form.

    messages: [{"role": "system"|"user"|"assistant", "content": [{"type": "image"} | {"type": "text", "text": str}],
                "loss": bool | None}]
    images:   image references in the order of the image parts
    where:    "file:line" (or "file[index]") for error messages
    extra:    every other column (grounding boxes, user id, solution, ...), passed on to rewards and evaluation
    """

    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    where: str = "?"
    extra: dict = field(default_factory=dict)

    @property
    def num_image_parts(self) -> int:
        return sum(1 for m in self.messages for p in m["content"] if p["type"] == "image")

    # One place for "the prompt", "the answer" and "the instruction" of a conversation: generation, GRPO prompts,
    # evaluation reports and batch inference all read them through these.
    @property
    def final_answer(self) -> str | None:
        """The text of the final assistant turn, or None when the conversation ends on another role."""
        last = self.messages[-1] if self.messages else None
        return message_text(last) if last is not None and last["role"] == "assistant" else None

    def prompt_only(self) -> "Sample":
        """The conversation without its final assistant turn (what a model is asked to continue)."""
        messages = self.messages[:-1] if self.final_answer is not None else list(self.messages)
        return Sample(messages=list(messages), images=self.images, where=self.where, extra=self.extra)

    def instruction(self, image_tag: str = "") -> str:
        """The text of the last user turn of the prompt (image parts written as `image_tag`)."""
        users = [m for m in self.prompt_only().messages if m["role"] == "user"]
        return message_text(users[-1], image_tag) if users else ""


def message_text(message: dict, image_tag: str = "") -> str:
    """The text of one canonical message: its text parts joined, each image part written as `image_tag`."""
    return "".join(p.get("text", "") if p["type"] == "text" else image_tag for p in message["content"])


def target_of(sample: Sample) -> dict:
    """Ground truth of a grounding sample: {"box": [x1, y1, x2, y2] px, "point": [x, y] px, "size": [w, h]}.

    Read from `extra["target"]` (vltune's synthetic data) or ms-swift's `objects.bbox` (pixels, bbox_type real).
    """
    if "target" in sample.extra:
        return sample.extra["target"]
    objects = sample.extra.get("objects") or {}
    boxes = objects.get("bbox") or []
    if boxes:
        b = boxes[0]
        if len(b) == 2:
            return {"point": list(b), "box": None}
        return {"box": list(b), "point": [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]}
    raise ValueError(f"{sample.where}: no grounding target (extra 'target' or 'objects.bbox')")


# ---------------------------------------------------------------- row normalisation
def _split_image_tags(text: str) -> list[dict]:
    parts: list[dict] = []
    for i, chunk in enumerate(text.split(IMAGE_TAG)):
        if i > 0:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def _resolve_ref(ref: Any, base_dir: str | None) -> Any:
    if isinstance(ref, str) and base_dir and not ref.startswith(("data:", "http://", "https://", "/")):
        return os.path.normpath(os.path.join(base_dir, ref))
    if isinstance(ref, dict) and ref.get("path") and not ref.get("bytes"):
        return _resolve_ref(ref["path"], base_dir)
    return ref


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def normalize_row(row: dict, base_dir: str | None = None, where: str = "?") -> Sample:
    """Turn one record of any supported layout into a `Sample` (raises DataError naming `where`)."""
    if isinstance(row, list):  # a bare list of messages (seeds/04 pickles)
        row = {"messages": row}
    if not isinstance(row, dict):
        raise DataError(f"expected an object per sample, got {type(row).__name__}", where)
    key = "messages" if "messages" in row else "conversations" if "conversations" in row else None
    if key is None:
        raise DataError("no 'messages' or 'conversations' field", where)
    turns = row[key] or []
    # A hand-edited file holds e.g. a list of strings here: a one-line DataError, not an AttributeError mid-read.
    if not isinstance(turns, (list, tuple)):
        raise DataError(f"'{key}' is a {type(turns).__name__}, expected a list of messages", where)
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            raise DataError(f"{key}[{i}] is a {type(m).__name__}, expected an object with a role and content", where)
    if key == "messages":
        raw_messages = [(m.get("role"), m.get("content"), m) for m in turns]
    else:
        raw_messages = [(m.get("from", m.get("role")), m.get("value", m.get("content")), m) for m in turns]
    images = [_resolve_ref(r, base_dir) for r in _as_list(row.get("images", row.get("image")))]
    inline_images = []
    messages = []
    for i, (role, content, original) in enumerate(raw_messages):
        role = ROLE_ALIASES.get(str(role).lower()) if role is not None else None
        if role is None:
            raise DataError(f"message {i} has an unknown role {original.get('role', original.get('from'))!r}", where)
        if isinstance(content, str):
            parts = _split_image_tags(content)
        elif isinstance(content, list):
            parts = []
            for p in content:
                if isinstance(p, str):
                    parts.extend(_split_image_tags(p))
                elif not isinstance(p, dict):
                    raise DataError(f"message {i}: content part of type {type(p).__name__}", where)
                elif p.get("type") == "image" or "image" in p or "image_url" in p:
                    parts.append({"type": "image"})
                    ref = p.get("image") or p.get("url") or p.get("path") or p.get("image_url")
                    if isinstance(ref, dict):
                        ref = ref.get("url")
                    if ref is not None:
                        inline_images.append(_resolve_ref(ref, base_dir))
                elif p.get("type") == "text" or "text" in p:
                    parts.extend(_split_image_tags(str(p.get("text", ""))))
                elif p.get("type") == "video" or "video" in p:
                    raise DataError(f"message {i}: video inputs are not supported yet", where)
                else:
                    raise DataError(f"message {i}: unknown content part {p}", where)
        elif content is None:
            parts = []
        else:
            raise DataError(f"message {i}: content of type {type(content).__name__}", where)
        loss = original.get("loss")
        if loss is None and "loss_scale" in original:
            try:
                loss = float(original["loss_scale"]) > 0
            except (TypeError, ValueError):
                raise DataError(f"message {i}: loss_scale {original['loss_scale']!r} is not a number", where) from None
        # Qwen-VL templates only accept a system message first (seeds/04 turns later ones into user turns).
        if role == "system" and messages:
            role = "user"
        messages.append({"role": role, "content": parts, "loss": loss})
    if inline_images and images:
        raise DataError("images given both inline in the content and in an 'images' column", where)
    images = images or inline_images
    extra = {k: v for k, v in row.items() if k not in KNOWN_COLUMNS}
    return Sample(messages=messages, images=images, where=where, extra=extra)


# ---------------------------------------------------------------- readers
def _read_jsonl(path: Path) -> Iterable[Sample]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield DataError(f"invalid JSON ({e.msg}, column {e.colno})", where)  # type: ignore[misc]
                continue
            try:
                yield normalize_row(row, str(path.parent), where)
            except DataError as e:
                yield e.at(where)  # type: ignore[misc]


def _read_json(path: Path) -> Iterable[Sample]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg} at line {e.lineno})", str(path)) from None
    if isinstance(data, dict):
        data = data.get("data") or data.get("samples") or [data]
    for i, row in enumerate(data):
        where = f"{path}[{i}]"
        try:
            yield normalize_row(row, str(path.parent), where)
        except DataError as e:
            yield e.at(where)  # type: ignore[misc]


def _read_hf(path: Path) -> Iterable[Sample]:
    import datasets

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    else:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    base = str(path if path.is_dir() else path.parent)
    for i, row in enumerate(ds):
        where = f"{path}[{i}]"
        try:
            yield normalize_row(dict(row), base, where)
        except DataError as e:
            yield e.at(where)  # type: ignore[misc]


USER_FILE = re.compile(r"user_(\d+)\.pkl$")


def _read_user_pickles(path: Path, users: set[int] | None, allow_pickle: bool) -> Iterable[Sample]:
    if not allow_pickle:
        raise DataError(
            "this is a per-user pickle directory; loading pickles runs code from the files. "
            "Pass --allow_pickle true if you trust them", str(path))
    import pickle

    files = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := USER_FILE.search(p.name)))
    if users is not None:
        missing = sorted(users - {u for u, _ in files})
        if missing:
            raise DataError(f"no user_<id>.pkl for users {missing}", str(path))
        files = [(u, p) for u, p in files if u in users]
    for user, p in files:
        with open(p, "rb") as f:
            rows = pickle.load(f)
        for i, row in enumerate(rows):
            where = f"{p}[{i}]"
            try:
                sample = normalize_row(row, str(p.parent), where)
            except DataError as e:
                yield e.at(where)  # type: ignore[misc]
                continue
            sample.extra.setdefault("user", user)
            yield sample


def _filter_users(samples: Iterable, users: set[int] | None) -> Iterable:
    for s in samples:
        if users is None or isinstance(s, DataError) or int(s.extra.get("user", -1)) in users:
            yield s


READERS: dict[str, Callable[..., Iterable]] = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "hf": _read_hf,
}


def detect_format(path: Path) -> str:
    if path.is_dir():
        if any(USER_FILE.search(p.name) for p in path.iterdir()):
            return "user_pickles"
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "hf"
        raise DataError("directory is neither a per-user pickle dir (user_<id>.pkl) nor a datasets.save_to_disk dir",
                        str(path))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        # JSON Lines saved with .json is common; peek at the first character.
        with open(path, encoding="utf-8") as f:
            head = f.read(1024).lstrip()
        return "json" if head.startswith("[") else "jsonl"
    if suffix == ".parquet":
        return "hf"
    raise DataError(f"unknown dataset format {suffix!r} (expected .jsonl, .json, .parquet or a directory)", str(path))


def iter_dataset(spec: str, users: str | None = None, allow_pickle: bool = False) -> Iterable:
    """Yield `Sample`s (and `DataError`s for records that could not be read) from `spec`."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError("no such file or directory; check the --dataset path", str(path))
    fmt = detect_format(path)
    user_set = parse_users(users)
    if fmt == "user_pickles":
        yield from _read_user_pickles(path, user_set, allow_pickle)
    else:
        yield from _filter_users(READERS[fmt](path), user_set)


def read_dataset(specs: str | list[str], users: str | None = None, allow_pickle: bool = False) -> tuple[list[Sample], list[DataError]]:
    """Read one or more datasets; return (samples, errors of records that could not be parsed)."""
    samples, errors = [], []
    for spec in _as_list(specs):
        found = 0
        for item in iter_dataset(spec, users, allow_pickle):
            (errors if isinstance(item, DataError) else samples).append(item)
            found += not isinstance(item, DataError)
        if users and not found and not errors:
            raise DataError(f"--users {users} matches no user here; {_users_in(spec, allow_pickle)}", spec)
    return samples, errors


def _users_in(spec: str, allow_pickle: bool) -> str:
    """Which users a data set holds, for the error of a --users that matches none of them."""
    ids = set()
    for item in iter_dataset(spec, None, allow_pickle):
        if isinstance(item, DataError):
            continue
        if "user" not in item.extra:
            return "its rows have no 'user' column, so drop --users (or add the column)"
        ids.add(int(item.extra["user"]))
    if not ids:
        return "it holds no readable row"
    return f"its users are {format_ids(ids)}"


def format_ids(ids) -> str:
    """{1, 2, 3, 5} -> '1-3,5' (the --users spelling)."""
    ids, runs = sorted(ids), []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
