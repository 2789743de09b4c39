"""Helpers the tests share (plain functions and constants; fixtures are in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("qwen3_vl", "qwen2_5_vl", "qwen2_vl", "idefics3")


def write_image(path: Path, color=(200, 30, 30), size=(64, 64)) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)
