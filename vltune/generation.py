"""Text generation from canonical samples: batched, left-padded answers (`generate_answers`) and the per-user
loop that switches adapters between groups of samples (`answers_per_user`). One module for `vltune infer`,
`vltune eval`, GRPO's held-out reward and the demo; it sits above data/ and models/ and below the recipes."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .data.formats import Sample
from .data.images import load_image
from .data.template import prompt_text
from .padding import padded_on


@torch.no_grad()
def generate_answers(model, processor, samples: list[Sample], batch_size: int = 16, max_new_tokens: int = 32,
                     desc: str = "generating", **generate_kwargs) -> list[str]:
    """Greedy (by default) answers to each sample's prompt (the conversation without its last assistant turn)."""
    tok = processor.tokenizer
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id, **generate_kwargs}
    if not gen.get("do_sample"):
        gen.update(temperature=None, top_p=None, top_k=None)
    answers: list[str] = []
    try:
        with padded_on(processor, "left"):
            for i in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False,
                          disable=len(samples) <= batch_size):
                chunk = samples[i:i + batch_size]
                texts = [prompt_text(s, processor) for s in chunk]
                images = [load_image(r) for s in chunk for r in s.images]
                inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt",
                                   add_special_tokens=False).to(device)
                out = model.generate(**inputs, **gen)
                new = out[:, inputs["input_ids"].shape[1]:]
                answers.extend(tok.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers


def indices_by_user(samples) -> dict:
    """{user (the `user` column, None without one): indices of their samples}, in order of first appearance."""
    groups: dict = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.extra.get("user"), []).append(i)
    return groups


def iter_answers_per_user(samples: list[Sample], model_for_user: Callable, answer: Callable):
    """Yield (sample index, user, value) as they come: `answer(model, samples_of_user, user)` for each user's
    samples inside `model_for_user(user)` (a context manager giving the model with that user's adapter active),
    one user after the other, so the adapter is switched once per user, not once per sample."""
    for user, idx in indices_by_user(samples).items():
        with model_for_user(user) as model:
            for i, value in zip(idx, answer(model, [samples[i] for i in idx], user)):
                yield i, user, value


def answers_per_user(samples: list[Sample], model_for_user: Callable, answer: Callable) -> list:
    """`iter_answers_per_user`'s values, returned in the samples' order."""
    results: list = [None] * len(samples)
    for i, _, value in iter_answers_per_user(samples, model_for_user, answer):
        results[i] = value
    return results
