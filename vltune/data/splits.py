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
