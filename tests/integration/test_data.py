"""`vltune data check`: every problem kind found with its file:line, boxes checked, no model weights loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vltune.data.check import BOX_MALFORMED, BOX_OUTSIDE, check_data, check_grounding_boxes
from vltune.data.errors import DataError
from vltune.data.formats import Sample
from vltune.args import merge_repeated_flags

from tests.helpers import write_image, write_jsonl


def _row(img="a.png", text="Click the red circle", answer="click(1, 2)", **extra):
    return {"messages": [{"role": "user", "content": f"<image>{text}"}, {"role": "assistant", "content": answer}],
            "images": [img] if isinstance(img, str) else img, **extra}


def _bad_set(tmp_path) -> tuple[str, dict[str, list[int]]]:
    """A JSONL with one or two samples of every problem kind; returns (path, {kind: [line numbers]})."""
    write_image(tmp_path / "a.png", size=(64, 48))
    png = (tmp_path / "a.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])  # valid header, data cut short
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    rows = [
        _row(objects={"ref": ["red circle"], "bbox": [[10, 10, 30, 30]]}),                     # 1 ok
        _row("missing.png"),                                                                  # 2 missing image
        _row("garbage.png"),                                                                  # 3 unreadable
        _row("truncated.png"),                                                                # 4 cut past the header
        _row(["a.png", "a.png"]),                                                             # 5 1 tag, 2 images
        _row(answer="   "),                                                                   # 6 empty assistant turn
        {"messages": [{"role": "user", "content": "<image>hi"},
                      {"role": "assistant", "content": "click(1, 2)", "loss": False}], "images": ["a.png"]},  # 7
        _row(text="click the red circle " * 100),                                             # 8 over max_length
        _row(objects={"ref": ["x"], "bbox": [[10, 10, 70, 30]]}),                             # 9 x2 > width 64
        _row(target={"box": [0, 0, 20, 20], "point": [10, 50], "size": [64, 48]}),           # 10 y > height 48
        _row(objects={"bbox": [[0.1, 0.2, 0.5, 1.2]], "bbox_type": "norm1"}),                 # 11 norm1 > 1
        _row(objects={"bbox": [[30, 10, 10, 30]]}),                                           # 12 x1 > x2
        "{not json",                                                                          # 13 invalid JSON
        _row(objects={"bbox": [[0, 0, 64, 48]]}, target={"box": [0, 0, 64, 48], "point": [64, 48]}),  # 14 ok (edges)
        _row(objects={"bbox": [[0.0, 0.0, 1.0, 1.0]], "bbox_type": "norm1"}),                 # 15 ok
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    expected = {"missing image": [2], "unreadable image": [3, 4], "image/tag mismatch": [5],
                "empty assistant turn": [6], "no trainable tokens": [7], "over max_length": [8],
                BOX_OUTSIDE: [9, 10, 11], BOX_MALFORMED: [12], "invalid sample": [13]}
    return path, expected


def test_every_problem_kind_is_found_with_its_location(tmp_path, processor_for):
    path, expected = _bad_set(tmp_path)
    summary = check_data([path], processor_for("qwen3_vl"), max_length=200, max_examples=5)
    assert dict(summary.counts) == {kind: len(lines) for kind, lines in expected.items()}
    for kind, lines in expected.items():
        assert [w for w, _ in summary.examples[kind]] == [f"{path}:{n}" for n in lines], kind
    assert summary.total == 15 and summary.ok == 3 and summary.failed
    assert "48 px" in summary.examples[BOX_OUTSIDE][1][1]  # the message names the image size it checked against
    lines = summary.lines()
    assert len(lines) == len(expected)  # one line per kind
    assert any(line.startswith(f"{BOX_OUTSIDE}: 3 sample(s) at {path}:9, {path}:10, {path}:11") for line in lines)


def test_header_only_mode_misses_a_truncated_image(tmp_path, processor_for):
    """The documented trade-off of --verify_images false: a file cut short passes on its header."""
    path, _ = _bad_set(tmp_path)
    summary = check_data([path], processor_for("qwen3_vl"), max_length=200, verify_images=False)
    assert summary.counts["unreadable image"] == 1  # garbage.png only; truncated.png has a valid header


@pytest.mark.parametrize("extra, error", [
    ({"objects": {"bbox": [[0, 0, 64, 48]]}}, None),
    ({"objects": {"bbox": [5, 5, 20, 20]}}, None),  # one flat box
    ({"objects": {"bbox": [[5, 5]]}}, None),  # a point
    ({"objects": {"bbox": [[-1, 5, 20, 20]]}}, BOX_OUTSIDE),
    ({"objects": {"bbox": [[5, 49]]}}, BOX_OUTSIDE),
    ({"objects": {"bbox": [[5, 5, 20]]}}, BOX_MALFORMED),
    ({"objects": {"bbox": [["5", 5, 20, 20]]}}, BOX_MALFORMED),
    ({"objects": {"bbox": [[0, 0, 1, 1]], "bbox_type": "norm1000"}}, BOX_MALFORMED),
    ({"target": {"box": [0, 0, 65, 10]}}, BOX_OUTSIDE),
    ({"target": {"point": [32, 24]}}, None),
])
def test_grounding_box_rules(extra, error):
    sample = Sample(messages=[], images=["unused.png"], where="d.jsonl:7", extra=extra)
    if error is None:
        check_grounding_boxes(sample, size=(64, 48))
    else:
        with pytest.raises(DataError) as info:
            check_grounding_boxes(sample, size=(64, 48))
        assert info.value.kind == error and info.value.where == "d.jsonl:7"


def test_a_box_without_an_image_is_reported():
    sample = Sample(messages=[], images=[], where="d.jsonl:3", extra={"objects": {"bbox": [[1, 1, 2, 2]]}})
    with pytest.raises(DataError, match="no image"):
        check_grounding_boxes(sample)


def test_worker_processes_give_the_same_summary(tmp_path, processor_for):
    """2000+ samples are split over forked workers; counts and the first locations must not change."""
    write_image(tmp_path / "a.png")
    rows = [_row() for _ in range(2400)]
    for i in (5, 1500, 2300):
        rows[i] = _row("missing.png")
    rows[1800] = _row(objects={"bbox": [[0, 0, 99, 10]]})
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    single = check_data([path], processor_for("qwen3_vl"), num_proc=1)
    forked = check_data([path], processor_for("qwen3_vl"), num_proc=2)
    assert dict(forked.counts) == dict(single.counts) == {"missing image": 3, BOX_OUTSIDE: 1}
    assert forked.examples == single.examples
    assert [w for w, _ in single.examples["missing image"]] == [f"{path}:{n}" for n in (6, 1501, 2301)]


def test_repeated_dataset_flags_are_merged():
    argv = ["--dataset", "a.jsonl", "--max_length", "9", "--dataset=b.jsonl", "--dataset", "c", "d"]
    merged = merge_repeated_flags(argv, ("dataset",))
    assert merged == ["--max_length", "9", "--dataset", "a.jsonl", "b.jsonl", "c", "d"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vltune", "data", "check", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_exit_status_and_one_line_per_kind(tmp_path, grounding_jsonl, tiny_path):
    tiny_path("qwen3_vl")  # build the tiny model in this session's cache, which the subprocess inherits
    path, expected = _bad_set(tmp_path)
    report = tmp_path / "report.json"
    bad = _cli("--dataset", path, "--dataset", grounding_jsonl, "--max_length", "200", "--report", str(report))
    assert bad.returncode == 1, bad.stderr[-2000:]
    out = bad.stdout.splitlines()
    assert out[0].startswith("checked 47 sample(s) from 2 data set(s)"), out[0]  # 15 + 32: both files checked
    kinds = {line.strip().split(":")[0] for line in out[1:]}
    assert kinds == set(expected) and len(out) == 1 + len(expected)
    assert f"{path}:2" in next(line for line in out if line.strip().startswith("missing image"))
    saved = json.loads(report.read_text())
    assert saved["problems"]["unreadable image"] == 2 and saved["ok"] == 32 + 3

    good = _cli("--dataset", grounding_jsonl)
    assert good.returncode == 0, good.stdout + good.stderr[-2000:]
    assert "32 ok, 0 with problems" in good.stdout


def test_check_loads_the_processor_but_never_model_weights(tmp_path, grounding_jsonl, tiny_path, monkeypatch):
    from transformers import PreTrainedModel

    from vltune.recipes import data as data_recipe

    tiny_path("qwen2_5_vl")  # built before the guard below: building a tiny model does construct one

    def refuse(*args, **kwargs):
        raise AssertionError("vltune data check must not build or load a model")

    monkeypatch.setattr(PreTrainedModel, "__init__", refuse)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    assert data_recipe.check(["--dataset", grounding_jsonl, "--model_family", "qwen2_5_vl", "--num_proc", "1"]) == 0
