"""The demo: a smoke run in the fast suite, the full learning claim as a slow test."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from vltune.data.formats import read_dataset
from vltune.eval.grounding import score_clicks
from vltune.recipes.demo import main as demo_main


def test_demo_smoke_runs_end_to_end_and_reports_baselines(tmp_path):
    """Small sizes and the xs model: checks the wiring and the report (the learning claim is the slow test)."""
    results = demo_main(["--output_dir", str(tmp_path), "--tiny_size", "xs", "--n_train", "48", "--n_test", "8",
                         "--epochs", "1"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["n_test"] == 8 and len(saved["examples_after"]) == 8
    # the reported accuracy is the share of held-out answers marked correct, and each mark is right
    assert saved["click_accuracy_after"] == sum(e["ok"] for e in saved["examples_after"]) / 8
    test, _ = read_dataset(str(tmp_path / "data" / "test.jsonl"))
    answers = [e["answer"] for e in saved["examples_after"]]
    rescored = score_clicks(test, answers, saved["task"]["convention"])
    assert [r["ok"] for r in rescored["per_sample"]] == [e["ok"] for e in saved["examples_after"]]
    # the constant-answer baseline is the most frequent training answer, scored on the held-out boards
    baseline = saved["constant_answer_baseline"]
    train, _ = read_dataset(str(tmp_path / "data" / "train.jsonl"))
    most_common = Counter(s.final_answer for s in train).most_common(1)[0][0]
    assert baseline["answer"] == most_common
    assert baseline["click_accuracy"] == score_clicks(test, [most_common] * 8, saved["task"]["convention"])["click_accuracy"]
    assert saved["chance_of_a_random_cell"] == pytest.approx(1 / 16)
    for name in ("clicks.png", "model/loss.png", "model/train.log", "data/train.jsonl"):
        assert (tmp_path / name).exists(), name
    assert results["click_accuracy_after"] == saved["click_accuracy_after"]


@pytest.mark.slow
def test_demo_learns_the_click_task(tmp_path):
    """The README's claim: >= 80% held-out click accuracy, far above the constant answer."""
    results = demo_main(["--output_dir", str(tmp_path)])
    assert results["click_accuracy_before"] < 0.2
    assert results["click_accuracy_after"] >= 0.8, results
    assert results["constant_answer_baseline"]["click_accuracy"] < 0.25
    assert results["total_seconds"] < 600
