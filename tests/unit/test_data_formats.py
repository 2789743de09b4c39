"""Readers for every supported layout, and bad inputs that are reported, never crash a run."""

from __future__ import annotations

import base64
import io
import json
import pickle

import pytest
from PIL import Image

from vltune.data.dataset import SFTDataset, validate_samples
from vltune.data.errors import DataError
from vltune.data.formats import parse_users, read_dataset

from tests.helpers import write_image, write_jsonl


def _row(img="a.png", text="Click the red circle", answer="click(1, 2)", **extra):
    return {"messages": [{"role": "user", "content": f"<image>{text}"}, {"role": "assistant", "content": answer}],
            "images": [img], **extra}


# ---------------------------------------------------------------- readers
def test_swift_jsonl_relative_absolute_and_base64_images(tmp_path):
    write_image(tmp_path / "imgs" / "a.png")
    abs_path = write_image(tmp_path / "elsewhere" / "b.png")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, format="PNG")
    b64 = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    path = write_jsonl(tmp_path / "d.jsonl", [_row("imgs/a.png"), _row(abs_path), _row(b64)])
    samples, errors = read_dataset(path)
    assert not errors and len(samples) == 3
    assert samples[0].images[0] == str(tmp_path / "imgs" / "a.png")
    assert samples[0].where == f"{path}:1"
    from vltune.data.images import load_image

    assert [load_image(s.images[0]).size for s in samples] == [(64, 64), (64, 64), (8, 8)]


def test_sharegpt_json_and_trl_content_lists(tmp_path):
    write_image(tmp_path / "a.png")
    sharegpt = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "<image>hi"},
                                   {"from": "gpt", "value": "hello"}], "image": "a.png"}]
    (tmp_path / "s.json").write_text(json.dumps(sharegpt))
    samples, errors = read_dataset(str(tmp_path / "s.json"))
    assert not errors
    assert [m["role"] for m in samples[0].messages] == ["system", "user", "assistant"]
    assert samples[0].messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "hi"}]
    # seeds/04: images inline in TRL-style content parts
    inline = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                         {"type": "text", "text": "tap"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "click(3, 4)"}]}]}]
    path = write_jsonl(tmp_path / "t.jsonl", inline)
    samples, errors = read_dataset(path)
    assert not errors and samples[0].images == [str(tmp_path / "a.png")]


def test_hf_datasets_save_to_disk_and_parquet(tmp_path):
    import datasets

    img = Image.new("RGB", (32, 32), "green")
    ds = datasets.Dataset.from_dict({
        "messages": [[{"role": "user", "content": "<image>where?"}, {"role": "assistant", "content": "click(5, 5)"}]],
        "images": [[img]],
    }).cast_column("images", datasets.Sequence(datasets.Image()))
    ds.save_to_disk(str(tmp_path / "disk"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for spec in (tmp_path / "disk", tmp_path / "d.parquet"):
        samples, errors = read_dataset(str(spec))
        assert not errors and len(samples) == 1
        from vltune.data.images import load_image

        assert load_image(samples[0].images[0]).size == (32, 32)


def test_user_pickles_need_opt_in_and_select_users(tmp_path):
    write_image(tmp_path / "a.png")
    for user in (1, 2, 11, 12):
        conv = [[{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": f"u{user}"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "click(1, 1)"}]}]]
        with open(tmp_path / f"user_{user}.pkl", "wb") as f:
            pickle.dump(conv, f)
    with pytest.raises(DataError, match="allow_pickle"):
        read_dataset(str(tmp_path))
    samples, _ = read_dataset(str(tmp_path), users="11-12", allow_pickle=True)
    assert sorted(s.extra["user"] for s in samples) == [11, 12]
    with pytest.raises(DataError, match=r"users \[3\]"):
        read_dataset(str(tmp_path), users="1-3", allow_pickle=True)
    assert parse_users("1,3,5-7") == {1, 3, 5, 6, 7}


# ---------------------------------------------------------------- bad inputs
@pytest.fixture
def bad_dataset(tmp_path):
    write_image(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    rows = [
        _row("ok.png"),                                                   # 1 fine
        _row("missing.png"),                                              # 2 missing image
        _row("corrupt.png"),                                              # 3 corrupt image
        {"messages": [{"role": "user", "content": "<image><image>two tags"},
                      {"role": "assistant", "content": "x"}], "images": ["ok.png"]},  # 4 tag/image mismatch
        _row("ok.png", answer="   "),                                     # 5 empty assistant turn
        _row("ok.png", text="word " * 400),                               # 6 over-long
        "{not json",                                                      # 7 unreadable line
        _row("ok.png", answer="click(9, 9)"),                             # 8 fine
    ]
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_each_bad_input_is_a_counted_skip_naming_file_and_line(bad_dataset, processor_for):
    samples, read_errors = read_dataset(bad_dataset)
    kept, _, report = validate_samples(samples, processor_for("qwen3_vl"), max_length=256, read_errors=read_errors)
    assert [s.where for s in kept] == [f"{bad_dataset}:1", f"{bad_dataset}:8"]
    assert report.total == 8 and report.kept == 2 and report.skipped == 6
    assert report.counts == {"missing image": 1, "unreadable image": 1, "image/tag mismatch": 1,
                             "empty assistant turn": 1, "over max_length": 1, "invalid sample": 1}
    text = "\n".join(report.lines())
    for line in (2, 3, 4, 5, 6, 7):
        assert f"{bad_dataset}:{line}" in text
    assert "missing.png" in text and "dropped, never truncated" in text


def test_strict_mode_stops_before_training(bad_dataset, tmp_path):
    from vltune.recipes.sft import main

    with pytest.raises(DataError, match="missing image"):
        main(["--dataset", bad_dataset, "--strict", "true", "--output_dir", str(tmp_path / "o"), "--max_steps", "1",
              "--report_to", "none"])


def test_image_corrupt_past_its_header_is_skipped_at_load_time(tmp_path, processor_for):
    """An image whose header reads but whose pixels do not decode is skipped mid-run, not fatal."""
    good = write_image(tmp_path / "good.png", size=(64, 64))
    data = open(good, "rb").read()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    path = write_jsonl(tmp_path / "d.jsonl", [_row("trunc.png"), _row("good.png")])
    samples, _ = read_dataset(path)
    ds = SFTDataset(samples)
    item = ds[0]
    assert item["sample"].where.endswith(":2")
    assert len(ds.runtime_skips) == 1 and f"{path}:1" in ds.runtime_skips[0]


def test_rows_that_used_to_crash_the_reader_are_counted_invalid_samples(tmp_path):
    """Messages that are strings, a bare list of numbers, a loss_scale that is not a number: one counted
    'invalid sample' each naming the line (they raised AttributeError / ValueError and stopped the run)."""
    write_image(tmp_path / "a.png")
    bad_scale = _row()
    bad_scale["messages"][1]["loss_scale"] = "high"
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": ["<image>hi", "click(1, 2)"], "images": ["a.png"]},
                                              [1, 2], {"messages": "hello"}, bad_scale, _row()])
    samples, errors = read_dataset(path)
    assert [s.where for s in samples] == [f"{path}:5"]
    assert [(e.where, e.kind) for e in errors] == [(f"{path}:{n}", "invalid sample") for n in (1, 2, 3, 4)]
    assert "loss_scale 'high' is not a number" in errors[3].message


def test_bomb_header_and_a_shape_the_processor_refuses_are_counted_not_fatal(tmp_path, processor_for):
    from vltune.data.synthetic_faults import png_bomb_header

    good = write_image(tmp_path / "a.png")
    (tmp_path / "bomb.png").write_bytes(png_bomb_header(open(good, "rb").read()))
    Image.new("RGB", (4000, 16)).save(tmp_path / "strip.png")  # aspect ratio 250: Qwen-VL's resize refuses it
    path = write_jsonl(tmp_path / "d.jsonl", [_row("bomb.png"), _row("strip.png"), _row("strip.png"), _row()])
    samples, _ = read_dataset(path)
    kept, _, report = validate_samples(samples, processor_for("qwen3_vl"), max_length=256)
    assert [s.where for s in kept] == [f"{path}:4"]
    assert report.counts == {"unreadable image": 1, "image refused by processor": 2}
    assert "decompression bomb" in report.problems["unreadable image"][0]


def test_a_sample_failing_at_load_time_is_counted_once_also_from_dataloader_workers(tmp_path):
    """The preflight batch and every epoch meet the same bad sample again, and with
    --dataloader_num_workers it fails in a worker process: still one skip, read back by the main process."""
    import torch

    from vltune.data.synthetic_faults import png_pixels_corrupt

    good = write_image(tmp_path / "good.png", size=(64, 64))
    (tmp_path / "bad.png").write_bytes(png_pixels_corrupt(open(good, "rb").read()))
    path = write_jsonl(tmp_path / "d.jsonl", [_row("good.png"), _row("bad.png"), _row("good.png")])
    samples, _ = read_dataset(path)
    (tmp_path / "run").mkdir()
    ds = SFTDataset(samples)
    ds.record_skips_to(tmp_path / "run")
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1, collate_fn=lambda b: b)
    for _ in range(2):  # two epochs, each in a new worker process; the bad sample is replaced by the next
        assert [f["sample"].where for batch in loader for f in batch] == [f"{path}:{n}" for n in (1, 3, 3)]
    assert [(e.where, e.kind) for e in ds.load_skips()] == [(f"{path}:2", "unreadable image")]
    ds[1]  # met again in this process (the preflight batch)
    assert len(ds.load_skips()) == 1 and len(ds.runtime_skips) == 1
    resumed = SFTDataset(samples)
    resumed.record_skips_to(tmp_path / "run", fresh=False)  # a resumed run keeps what was counted before it
    assert len(resumed.load_skips()) == 1
    SFTDataset(samples).record_skips_to(tmp_path / "run", fresh=True)
    assert not list((tmp_path / "run").glob("skipped_at_load*"))
