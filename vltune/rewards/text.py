"""Text rewards: answer accuracy against a reference, output format (regex), and length."""

from __future__ import annotations

import re

from .registry import RewardContext, completion_text

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> str:
    """The part of an answer to compare: inside <answer>...</answer> if present, else the whole text."""
    m = ANSWER_TAG.search(text)
    return (m.group(1) if m else text).strip()


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip(".").lower())


def answers_match(answer: str, reference: str) -> bool:
    """Numbers compare as numbers (the last number of the answer, so reasoning before it is fine);
    anything else compares case- and whitespace-insensitively."""
    ref = extract_answer(reference)
    ans = extract_answer(answer)
    if NUMBER.fullmatch(ref.strip()):
        numbers = NUMBER.findall(ans)
        return bool(numbers) and abs(float(numbers[-1]) - float(ref)) < 1e-6
    return _normalise(ans) == _normalise(ref)


class AccuracyReward:
    """1.0 if the answer matches the row's `solution` column (the data set's final assistant turn when the
    data has no `solution` column), else 0.0; None for rows without a reference."""

    def __init__(self, ctx: RewardContext):
        self.column = getattr(ctx.args, "solution_column", None) or "solution"

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        refs = kwargs.get(self.column) or [None] * len(completions)
        return [None if ref is None else float(answers_match(completion_text(c), str(ref)))
                for c, ref in zip(completions, refs)]


class FormatReward:
    """1.0 if the whole answer matches --format_pattern (a regular expression), else 0.0."""

    def __init__(self, ctx: RewardContext):
        pattern = getattr(ctx.args, "format_pattern", None) or r"<think>.*?</think>\s*<answer>.*?</answer>"
        try:
            self.pattern = re.compile(pattern, re.DOTALL)
        except re.error as e:
            raise ValueError(f"--format_pattern {pattern!r} is not a valid regular expression: {e}") from None

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return [1.0 if self.pattern.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]


class LengthReward:
    """Closeness to --length_target tokens: max(0, 1 - |n - target| / target) (1.0 at the target length)."""

    def __init__(self, ctx: RewardContext):
        self.target = int(getattr(ctx.args, "length_target", 0) or 0)
        if self.target <= 0:
            raise ValueError("the length reward needs --length_target N (tokens, > 0)")

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is not None:
            lengths = [len(ids) for ids in completion_ids]
        else:  # outside the trainer: characters / 4 is a rough token count
            lengths = [len(completion_text(c)) / 4 for c in completions]
        return [max(0.0, 1.0 - abs(n - self.target) / self.target) for n in lengths]
