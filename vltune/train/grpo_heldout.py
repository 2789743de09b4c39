"""GRPO's held-out figure: the mean weighted reward of the policy on prompts it does not train on, measured
the same way before and after training."""

from __future__ import annotations

import torch

from ..data.images import load_image
from ..generation import generate_answers
from ..rewards.registry import completion_text
from .grpo_prompts import PromptRow


def heldout_reward(model, processor, rows: list[PromptRow], reward_funcs: list, weights: list[float] | None,
                   max_new_tokens: int, generations: int = 4, temperature: float = 1.0, seed: int = 0,
                   desc: str = "held-out") -> dict:
    """Mean weighted reward on held-out prompts (None = reward n/a, as in TRL's nansum): of `generations` answers
    sampled per prompt at `temperature` (seeded, so before/after see the same random stream), or of one greedy
    answer per prompt when generations == 0."""
    gen = {}
    if generations > 0:
        rows = [r for r in rows for _ in range(generations)]
        gen = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
    with _seeded(seed):
        answers = generate_answers(model, processor, [r.sample for r in rows], max_new_tokens=max_new_tokens,
                                   desc=desc, **gen)
    tok = processor.tokenizer
    weights = list(weights) if weights else [1.0] * len(reward_funcs)
    columns = sorted({k for r in rows for k in r.columns})
    kwargs = {c: [r.columns.get(c) for r in rows] for c in columns}
    if any(r.sample.images for r in rows):
        kwargs["images"] = [[load_image(ref) for ref in r.sample.images] for r in rows]
    kwargs.update(trainer_state=None, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    per_func, total = {}, [0.0] * len(rows)
    for fn, w in zip(reward_funcs, weights):
        values = fn(prompts=[r.prompt for r in rows], completions=completions, completion_ids=ids, **kwargs)
        valid = [v for v in values if v is not None]
        per_func[fn.__name__] = sum(valid) / len(valid) if valid else None
        total = [t + w * (v or 0.0) for t, v in zip(total, values)]
    return {"n": len(rows), "sampled": generations > 0, "mean_reward": sum(total) / max(len(total), 1),
            "rewards": per_func,
            "examples": [{"prompt": completion_text(r.prompt[-1:])[-120:], "answer": a}
                         for r, a in list(zip(rows, answers))[:8]]}


class _seeded:
    """Fork torch's RNG for a block: a fixed seed inside, the caller's RNG state restored after."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.fork = torch.random.fork_rng()
        self.fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)
