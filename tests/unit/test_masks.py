"""Assistant-only labels: exactly the assistant text + its end token, for every family."""

from __future__ import annotations

import pytest
from PIL import Image

from vltune.data.dataset import SFTCollator, validate_samples
from vltune.data.formats import normalize_row
from vltune.data.template import IGNORE_INDEX

from tests.helpers import FAMILIES

END = {"qwen3_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>", "qwen2_vl": "<|im_end|>", "idefics3": "<end_of_utterance>"}
IMG = Image.new("RGB", (64, 64), (10, 200, 10))


def labelled_text(processor, rows, loss_scale="default", strip=True, train_separator=False):
    samples = [normalize_row(r, None, f"t:{i}") for i, r in enumerate(rows)]
    batch = SFTCollator(processor, loss_scale, train_separator=train_separator)([{"sample": s, "images": [IMG] * len(s.images)} for s in samples])
    tok = processor.tokenizer
    out = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        trained = labels != IGNORE_INDEX
        assert (labels[trained] == ids[trained]).all(), "labels must equal input ids where trained"
        assert not trained[mask == 0].any(), "padding must never be trained"
        # Collect each contiguous run of trained tokens as one decoded piece.
        runs, cur = [], []
        for i, t in enumerate(trained.tolist()):
            if t:
                cur.append(int(ids[i]))
            elif cur:
                runs.append(tok.decode(cur)), cur.clear()
        if cur:
            runs.append(tok.decode(cur))
        out.append([r.strip() for r in runs] if strip else runs)
    return out, batch


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_multi_image_system_and_loss_false(family, processor_for):
    proc = processor_for(family)
    end = END[family]
    rows = [
        {"messages": [
            {"role": "system", "content": "You are a GUI agent."},
            {"role": "user", "content": "<image>Click the red circle"},
            {"role": "assistant", "content": "click(125, 375)"},
            {"role": "user", "content": "Now this one <image>"},
            {"role": "assistant", "content": "I will not say this", "loss": False},
            {"role": "user", "content": "and finally?"},
            {"role": "assistant", "content": "click(875, 625)"},
        ], "images": [IMG, IMG]},
        {"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "hello there"}],
         "images": [IMG]},
    ]
    runs, batch = labelled_text(proc, rows)
    assert runs[0] == [f"click(125, 375){end}", f"click(875, 625){end}"]
    assert runs[1] == [f"hello there{end}"]
    # The system prompt, user turns, image tokens and role headers are all masked.
    image_token_id = proc.image_token_id
    assert (batch["labels"][batch["input_ids"] == image_token_id] == IGNORE_INDEX).all()


@pytest.mark.parametrize("family", ["qwen3_vl", "idefics3"])
def test_last_round_only(family, processor_for):
    proc = processor_for(family)
    rows = [{"messages": [
        {"role": "user", "content": "<image>first"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "two"}], "images": [IMG]}]
    runs, _ = labelled_text(proc, rows, loss_scale="last_round")
    assert runs[0] == [f"two{END[family]}"]


def test_content_list_format_matches_tag_format(processor_for):
    """TRL content lists and ms-swift <image> tags give identical tokens and labels."""
    proc = processor_for("qwen3_vl")
    tagged = {"messages": [{"role": "user", "content": "<image>Tap the blue square"},
                           {"role": "assistant", "content": "click(1, 2)"}], "images": [IMG]}
    listed = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Tap the blue square"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "click(1, 2)"}]}], "images": [IMG]}
    _, a = labelled_text(proc, [tagged])
    _, b = labelled_text(proc, [listed])
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    assert a["labels"].tolist() == b["labels"].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_length_estimate_matches_the_processor(family, processor_for):
    """The up-front length check (no image decoding) counts exactly the tokens the collator produces."""
    proc = processor_for(family)
    rows = [{"messages": [{"role": "user", "content": "<image><image>two images"},
                          {"role": "assistant", "content": "ok"}], "images": [IMG, Image.new("RGB", (96, 64))]}]
    samples = [normalize_row(r) for r in rows]
    _, lengths, report = validate_samples(samples, proc, max_length=None)
    batch = SFTCollator(proc)([{"sample": samples[0], "images": rows[0]["images"]}])
    assert report.skipped == 0
    assert lengths[0] == int(batch["attention_mask"].sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_train_separator_trains_the_newline_after_the_end_token_like_the_peers(family, processor_for):
    """ms-swift, LLaMA-Factory and TRL train the template's newline after the end token; with --train_separator
    so does vltune (same trained tokens -> same loss, benchmarks/sft_throughput.py); without it the run ends at
    the end token. The next turn's header stays masked either way."""
    proc = processor_for(family)
    end = END[family]
    rows = [{"messages": [{"role": "user", "content": "<image>first"}, {"role": "assistant", "content": "one"},
                          {"role": "user", "content": "second"}, {"role": "assistant", "content": "two"}],
             "images": [IMG]}]
    runs, _ = labelled_text(proc, rows, strip=False, train_separator=True)
    assert [r.lstrip(" ") for r in runs[0]] == [f"one{end}\n", f"two{end}\n"]
    runs, _ = labelled_text(proc, rows, strip=False)
    assert [r.lstrip(" ") for r in runs[0]] == [f"one{end}", f"two{end}"]
