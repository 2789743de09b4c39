"""Click coordinates in each family's convention, and parsing them out of answers.

- "rel1000" (Qwen2-VL, Qwen3-VL, Idefics3/SmolVLM here): integers 0-1000 relative to the image.
- "abs_resized" (Qwen2.5-VL): pixels of the image *after* the processor's resize (smart_resize with the
  processor's min/max pixels). Converting through the processor that is actually used is what keeps
  clicks from drifting when --max_pixels differs between runs.
"""

from __future__ import annotations

import re

CLICK_RE = re.compile(r"click\s*\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)", re.IGNORECASE)
PAIR_RE = re.compile(r"[\[(]\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*[\])]")


def resized_size(processor, width: int, height: int) -> tuple[int, int]:
    """(width, height) the image processor resizes an image of this size to (Qwen-VL smart_resize)."""
    ip = processor.image_processor
    if hasattr(ip, "merge_size") and hasattr(ip, "patch_size"):
        # the PIL module: the torchvision one does not import beside the CPU torch build
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        size = ip.size or {}
        h, w = smart_resize(height, width, factor=ip.patch_size * ip.merge_size,
                            min_pixels=size.get("shortest_edge", 56 * 56), max_pixels=size.get("longest_edge", 28 * 28 * 1280))
        return w, h
    return width, height


def to_model_coords(x: float, y: float, width: int, height: int, convention: str, processor=None) -> tuple[int, int]:
    """Pixel (x, y) in the original image -> the integers the model should answer."""
    if convention == "rel1000":
        return round(x / width * 1000), round(y / height * 1000)
    if convention == "abs_resized":
        rw, rh = resized_size(processor, width, height)
        return round(x * rw / width), round(y * rh / height)
    raise ValueError(f"unknown coordinate convention {convention!r}")


def from_model_coords(mx: float, my: float, width: int, height: int, convention: str, processor=None) -> tuple[float, float]:
    """The model's answer integers -> pixel (x, y) in the original image."""
    if convention == "rel1000":
        return mx / 1000 * width, my / 1000 * height
    if convention == "abs_resized":
        rw, rh = resized_size(processor, width, height)
        return mx * width / rw, my * height / rh
    raise ValueError(f"unknown coordinate convention {convention!r}")


def parse_click(text: str) -> tuple[float, float] | None:
    """The first `click(x, y)` in `text` (or a bare `(x, y)` / `[x, y]` pair); None if there is none."""
    m = CLICK_RE.search(text) or PAIR_RE.search(text)
    if not m:
        return None
    return float(m.group(1)), float(m.group(2))


def format_click(mx: int, my: int) -> str:
    return f"click({mx}, {my})"
