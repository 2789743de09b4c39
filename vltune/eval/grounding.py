"""Grounding scores: parse clicks, score them against target boxes, and sum them up per user and per kind."""

from __future__ import annotations

import math
import statistics
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


def frequent_app_instructions(train: list[Sample], test: list[Sample]) -> tuple[list[Sample], dict]:
    """The no-training personalisation baseline: each habit row of `test` asked as an explicit instruction
    naming the app its user used most often in that category in `train` (their history, habit and explicit
    rows alike). Needs the `user`, `kind`, `category` and `app` columns (`vltune data synth gui` writes them);
    other rows are returned unchanged. Returns (rewritten samples, {user: {category: app}})."""
    counts: dict = defaultdict(Counter)
    for s in train:
        if s.extra.get("category") is not None and s.extra.get("app") is not None:
            counts[(s.extra.get("user"), s.extra["category"])][s.extra["app"]] += 1
    memory: dict = defaultdict(dict)
    for (user, cat), c in counts.items():
        memory[user][cat] = c.most_common(1)[0][0]
    out = []
    for s in test:
        app = memory.get(s.extra.get("user"), {}).get(s.extra.get("category"))
        if s.extra.get("kind") != "habit" or app is None:
            out.append(s)
            continue
        messages = [dict(m) for m in s.messages]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")  # the instruction
        parts = [p for p in messages[last_user]["content"] if p["type"] != "text"]  # the image(s) stay
        messages[last_user]["content"] = [*parts, {"type": "text", "text": f"Open {app}"}]
        out.append(Sample(messages, s.images, s.where, s.extra))
    return out, {u: dict(m) for u, m in memory.items()}


def user_gains(base: dict, other: dict) -> dict:
    """Per-user click-accuracy gain of setup `other` over `base` (breakdown() outputs): each user, the
    spread (min / median / max, in points) and how many users are worse."""
    gains = {u: 100 * (other["per_user"][u]["click_accuracy"] - b["click_accuracy"])
             for u, b in base["per_user"].items() if u in other["per_user"]}
    vals = sorted(gains.values())
    if not vals:
        return {"per_user": {}, "min": None, "median": None, "max": None, "worse": 0, "n_users": 0}
    return {"per_user": gains, "min": vals[0], "median": statistics.median(vals), "max": vals[-1],
            "worse": sum(v < 0 for v in vals), "n_users": len(vals)}


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
