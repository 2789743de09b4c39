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


def packing_rows() -> list[dict]:
    """Three chat rows of different lengths for the packing tests: one image, two images + an untrained turn,
    text only."""
    from PIL import Image

    red, green, blue = (Image.new("RGB", s, c) for s, c in (((64, 64), (200, 0, 0)), ((96, 64), (0, 200, 0)),
                                                            ((64, 128), (0, 0, 200))))
    return [
        {"messages": [{"role": "user", "content": "<image>Click the red circle"},
                      {"role": "assistant", "content": "click(125, 375)"}], "images": [red]},
        {"messages": [{"role": "user", "content": "<image>compare with <image>"},
                      {"role": "assistant", "content": "not trained here", "loss": False},
                      {"role": "user", "content": "and now?"},
                      {"role": "assistant", "content": "a longer answer of several words"}], "images": [green, blue]},
        {"messages": [{"role": "user", "content": "text only"}, {"role": "assistant", "content": "ok"}], "images": []},
    ]


def packing_features(rows: list[dict]) -> list[dict]:
    """The collator's input for `rows` (what SFTDataset yields)."""
    from vltune.data.formats import normalize_row

    return [{"sample": normalize_row(r, None, f"t:{i}"), "images": list(r["images"])} for i, r in enumerate(rows)]
