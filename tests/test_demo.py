"""The demo: a smoke run in the fast suite, the full learning claim as a slow test."""

from __future__ import annotations

import json
import pytest

from vltune.recipes.demo import main as demo_main


def test_demo_smoke_runs_end_to_end_and_reports_baselines(tmp_path):
    """Small sizes and the xs model: checks the wiring and the report (the learning claim is the slow test)."""
    results = demo_main(["--output_dir", str(tmp_path), "--tiny_size", "xs", "--n_train", "48", "--n_test", "8",
                         "--epochs", "1"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["n_test"] == 8 and 0.0 <= saved["click_accuracy_after"] <= 1.0
    assert 0.0 <= saved["constant_answer_baseline"]["click_accuracy"] <= 1.0
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
