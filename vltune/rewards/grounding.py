"""Grounding rewards: a click inside the target box, and the IoU of a predicted box.

The answer is read in the model family's coordinate convention (0-1000 relative for Qwen2/3-VL,
pixels of the processor-resized image for Qwen2.5-VL; `vltune.coords`) and converted to
pixels of the original image, where the target lives. Targets come from the data set's columns,
as for `vltune eval grounding`: `target = {"box": [x1, y1, x2, y2], "size": [w, h]}` (vltune's
synthetic data) or ms-swift's `objects = {"bbox": [[x1, y1, x2, y2]]}` (pixels). A row without a
target gets None (the reward does not apply), so grounding and non-grounding data can be mixed.
"""

from __future__ import annotations

import re

from ..coords import from_model_coords, parse_click
from ..data.formats import Sample, target_of
from .registry import RewardContext, completion_text

NUMBER = r"-?\d+(?:\.\d+)?"
BOX_RE = re.compile(rf"[\[(]\s*({NUMBER})\s*,\s*({NUMBER})\s*,\s*({NUMBER})\s*,\s*({NUMBER})\s*[\])]")


def _row(kwargs: dict, i: int) -> dict:
    skip = ("trainer_state", "log_extra", "log_metric", "completion_ids", "prompts")
    return {k: v[i] for k, v in kwargs.items() if k not in skip and isinstance(v, list) and len(v) > i}


def _target_and_size(row: dict) -> tuple[dict | None, tuple[float, float] | None]:
    row = {k: v for k, v in row.items() if v is not None}  # a column this row lacks arrives as None
    try:
        target = target_of(Sample(messages=[], extra=row))
    except (ValueError, TypeError, KeyError):
        return None, None
    size = target.get("size")
    if not size:
        images = row.get("images") or []
        if images and hasattr(images[0], "size"):
            size = images[0].size
    return target, (tuple(size) if size else None)


class _BoxTargetReward:
    """Per completion: None where the row has no target box (the reward does not apply), else `score`."""

    def __init__(self, ctx: RewardContext):
        self.ctx = ctx

    def to_pixels(self, mx: float, my: float, size) -> tuple[float, float]:
        return from_model_coords(mx, my, size[0], size[1], self.ctx.coords, self.ctx.processor)

    def score(self, text: str, box: list[float], size) -> float:
        raise NotImplementedError

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        out: list[float | None] = []
        for i, completion in enumerate(completions):
            target, size = _target_and_size(_row(kwargs, i))
            if target is None or not target.get("box") or size is None:
                out.append(None)
            else:
                out.append(self.score(completion_text(completion), list(target["box"]), size))
        return out


class ClickReward(_BoxTargetReward):
    """1.0 if the answer's click(x, y) lies inside the target box, else 0.0 (unparseable: 0.0)."""

    def score(self, text: str, box: list[float], size) -> float:
        click = parse_click(text)
        if click is None:
            return 0.0
        x, y = self.to_pixels(click[0], click[1], size)
        return 1.0 if box[0] <= x <= box[2] and box[1] <= y <= box[3] else 0.0


def box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class IoUReward(_BoxTargetReward):
    """IoU (0..1) between the first [x1, y1, x2, y2] in the answer and the target box; 0.0 if none is given."""

    def score(self, text: str, box: list[float], size) -> float:
        m = BOX_RE.search(text)
        if not m:
            return 0.0
        v = [float(g) for g in m.groups()]
        p1, p2 = self.to_pixels(v[0], v[1], size), self.to_pixels(v[2], v[3], size)
        pred = [min(p1[0], p2[0]), min(p1[1], p2[1]), max(p1[0], p2[0]), max(p1[1], p2[1])]
        return box_iou(pred, box)
