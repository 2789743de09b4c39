"""Checks on flag values, run by `config.parse_args` right after parsing: before any data is read or any
weight loaded, so a typo costs a second, not a model load. Each failure is a `UsageError`: one line naming
the flag, what was wrong and the fix.

Checks go by field name, so they apply to every command that has the field:
- a field whose metadata lists `choices` must hold one of them (also when the value came from --config);
- numbers that must be positive (`lora_rank`, `lora_alpha`, `max_length`, ...), at least 0 (`image_cache_mb`) or
  in a range (`lora_dropout`);
- `--users` / `--test_users` must parse as user ids ('11-83', '1,3,5-7');
- `--model` given as a local path must exist (a hub id is left to from_pretrained).
Data paths are checked where the data is read (vltune.data.formats, before any weight is loaded): a config
file may name data that a later step writes.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields, is_dataclass
from typing import Any

from .errors import UsageError

POSITIVE = ("lora_rank", "lora_alpha", "max_length", "num_samples", "max_new_tokens", "num_generations",
            "max_completion_length", "samples_per_user", "test_per_user", "max_pixels", "min_pixels")
NON_NEGATIVE = {"image_cache_mb": "0 turns the cache off"}
FRACTION = {"lora_dropout": (0.0, 1.0, "in [0, 1)")}
USER_FIELDS = ("users", "test_users")
MODEL_FIELDS = ("model", "base", "zero_shot")
USER_FILE = re.compile(r"user_(\d+)\.pkl$")


def parse_users(spec: Any, flag: str = "--users") -> set[int] | None:
    """'11-83' / '1,3,5-7' -> a set of user ids; None when no spec is given. A bad spec is a UsageError."""
    if spec is None or spec == "":
        return None
    users: set[int] = set()
    example = "e.g. '11-83' or '1,3,5-7'"
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part) or re.fullmatch(r"(\d+)", part)
        if not m:
            raise UsageError(f"{flag} {spec!r}: {part!r} is not a user id or a range LO-HI of ids; write {example}")
        if len(m.groups()) == 2:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise UsageError(f"{flag} {spec!r}: the range {part} runs backwards; write {hi}-{lo}")
            users.update(range(lo, hi + 1))
        else:
            users.add(int(m.group(1)))
    return users


def looks_like_path(value: str) -> bool:
    """A local path rather than a hub id ('namespace/name' or 'name')."""
    return (value.startswith(("/", "./", "../", "~", ".\\")) or value.count("/") > 1 or "\\" in value
            or value.endswith((".jsonl", ".json", ".parquet", ".pkl")))


def check_values(objs: tuple) -> None:
    """Raise a UsageError for the first bad flag value in the parsed argument dataclasses."""
    for obj in objs:
        if not is_dataclass(obj):
            continue
        values = {f.name: getattr(obj, f.name, None) for f in fields(obj)}
        for f in fields(obj):
            value = values[f.name]
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise UsageError(f"--{f.name} {value}: not a valid value; choose one of {', '.join(map(str, choices))}")
            if f.name in POSITIVE and isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                raise UsageError(f"--{f.name} {value}: must be a positive number")
            if f.name in NON_NEGATIVE and isinstance(value, (int, float)) and value < 0:
                raise UsageError(f"--{f.name} {value}: must be 0 or more ({NON_NEGATIVE[f.name]})")
            if f.name in FRACTION and isinstance(value, (int, float)):
                lo, hi, text = FRACTION[f.name]
                if not lo <= value < hi:
                    raise UsageError(f"--{f.name} {value}: must be {text}")
            if f.name in USER_FIELDS and isinstance(value, str):
                parse_users(value, f"--{f.name}")
            if f.name in MODEL_FIELDS and isinstance(value, str) and value != "auto":
                check_model_path(value, f"--{f.name}")
            if f.name == "resume_from_checkpoint" and isinstance(value, str) and value.lower() not in (
                    "", "true", "false") and not os.path.isdir(os.path.expanduser(value)):
                raise UsageError(f"--resume_from_checkpoint {value}: no such checkpoint directory; give a "
                                 f"checkpoint-N directory of an earlier run, or leave the flag out to start fresh")


def check_model_path(value: str, flag: str = "--model") -> None:
    path = os.path.expanduser(value)
    if os.path.exists(path) or not looks_like_path(value):
        return
    raise UsageError(f"{flag} {value}: no such directory; give a local model directory (a hub id such as "
                     f"Qwen/Qwen3-VL-2B-Instruct needs network access or the local Hugging Face cache)")


def check_users_have_data(users: str | None) -> None:
    """Called where a recipe falls back to the demo data (no --dataset): --users would then select nothing."""
    if users:
        raise UsageError(f"--users {users} selects users of a per-user data set, but no --dataset is given "
                         f"(the default demo data has no users); give --dataset, or drop --users")
