"""Grounding evaluation: generate answers, parse clicks, score them against target boxes."""

from __future__ import annotations

import math
from collections import Counter

import torch
from tqdm.auto import tqdm

from ..data.formats import Sample
from ..data.images import load_image
from ..data.template import padded_on, prompt_text
from .coords import from_model_coords, parse_click


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


def target_of(sample: Sample) -> dict:
    """Ground truth of a grounding sample: {"box": [x1, y1, x2, y2] px, "point": [x, y] px, "size": [w, h]}.

    Read from `extra["target"]` (vltune's synthetic data) or ms-swift's `objects.bbox` (pixels, bbox_type real).
    """
    if "target" in sample.extra:
        return sample.extra["target"]
    objects = sample.extra.get("objects") or {}
    boxes = objects.get("bbox") or []
    if boxes:
        b = boxes[0]
        if len(b) == 2:
            return {"point": list(b), "box": None}
        return {"box": list(b), "point": [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]}
    raise ValueError(f"{sample.where}: no grounding target (extra 'target' or 'objects.bbox')")


def score_clicks(samples: list[Sample], answers: list[str], convention: str, processor=None) -> dict:
    """Click accuracy (point inside the target box), mean distance error (px) and unparseable rate."""
    hits, dists, unparsed, per = 0, [], 0, []
    for s, a in zip(samples, answers):
        t = target_of(s)
        w, h = t["size"] if "size" in t else load_image(s.images[0]).size
        click = parse_click(a)
        if click is None:
            unparsed += 1
            per.append({"where": s.where, "answer": a, "pred": None, "ok": False, "distance_px": None})
            continue
        px, py = from_model_coords(click[0], click[1], w, h, convention, processor)
        box = t.get("box")
        ok = bool(box) and box[0] <= px <= box[2] and box[1] <= py <= box[3]
        hits += ok
        tx, ty = t["point"]
        dists.append(math.hypot(px - tx, py - ty))
        per.append({"where": s.where, "answer": a, "pred": [px, py], "ok": ok, "distance_px": dists[-1]})
    n = max(len(samples), 1)
    return {
        "n": len(samples),
        "click_accuracy": hits / n,
        "mean_distance_px": sum(dists) / len(dists) if dists else None,
        "unparseable_rate": unparsed / n,
        "per_sample": per,
    }


def constant_answer_baseline(train: list[Sample], test: list[Sample], convention: str, processor=None) -> dict:
    """Accuracy of always giving the most frequent training answer: the bar a real model must clear."""
    answers = Counter(m["content"][-1]["text"] for s in train for m in s.messages[-1:] if m["role"] == "assistant")
    best, _ = answers.most_common(1)[0]
    scored = score_clicks(test, [best] * len(test), convention, processor)
    return {"answer": best, "click_accuracy": scored["click_accuracy"]}
