"""Held-out splits shared by the recipes (SFT samples, GRPO prompts, VLA episodes)."""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def split_holdout(items: Sequence[T], ratio: float, seed: int) -> tuple[list[T], list[T]]:
    """(kept, held out): a seeded random `ratio` of `items` (at least one) held out; both keep the input order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, int(len(items) * ratio))])
    return ([x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held])


def split_holdout_groups(items: Sequence[T], ratio: float, seed: int, key) -> tuple[list[T], list[T]]:
    """`split_holdout` over whole groups (`key(item)`, e.g. the screenshot): no group is on both sides, so a
    held-out slice never shows a screen the kept part trained on. Holds out at least one group when there are
    two or more; with one group nothing is held out."""
    groups = list(dict.fromkeys(key(x) for x in items))
    if len(groups) < 2 or ratio <= 0:
        return list(items), []
    _, held_groups = split_holdout(groups, ratio, seed)
    held = set(held_groups)
    return [x for x in items if key(x) not in held], [x for x in items if key(x) in held]
