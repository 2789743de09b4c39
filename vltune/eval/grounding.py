"""Grounding scores: parse clicks, score them against target boxes, and sum them up per user and per kind."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from ..coords import from_model_coords, parse_click
from ..data.formats import Sample, target_of
from ..data.images import load_image


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


def summarize(records: list[dict]) -> dict:
    """{n, click_accuracy, mean_distance_px, unparseable_rate} over per-sample records."""
    n = len(records)
    dists = [r["distance_px"] for r in records if r["distance_px"] is not None]
    return {
        "n": n,
        "click_accuracy": sum(r["ok"] for r in records) / n if n else None,
        "mean_distance_px": sum(dists) / len(dists) if dists else None,
        "unparseable_rate": sum(r["pred"] is None for r in records) / n if n else None,
    }


def _user_key(user) -> tuple:
    """Numeric user ids in numeric order (2 before 10), anything else after them."""
    try:
        return (0, int(user), "")
    except (TypeError, ValueError):
        return (1, 0, str(user))


def breakdown(records: list[dict]) -> dict:
    """Overall, per user and per instruction kind."""
    by_user, by_kind = defaultdict(list), defaultdict(list)
    for r in records:
        by_user[r["user"]].append(r)
        if r.get("kind") is not None:
            by_kind[r["kind"]].append(r)
    return {"overall": summarize(records),
            "per_user": {str(u): summarize(rs) for u, rs in sorted(by_user.items(), key=lambda kv: _user_key(kv[0]))},
            "per_kind": {k: summarize(rs) for k, rs in sorted(by_kind.items())}}


def score_samples(samples, answers, convention: str, processor) -> list[dict]:
    """score_clicks' per-sample records plus the user, the instruction kind and the target."""
    scored = score_clicks(samples, answers, convention, processor)["per_sample"]
    return [{**r, "user": s.extra.get("user"), "kind": s.extra.get("kind"), "target": target_of(s)}
            for s, r in zip(samples, scored)]
