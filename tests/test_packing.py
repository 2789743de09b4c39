"""Padding-free batches and packing: the same losses, gradients and labels as padded batches, per family."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vltune.data.dataset import SFTCollator
from vltune.data.formats import normalize_row
from vltune.data.packing import (PackedDataset, PaddingFreeCollator, find_rope_index, length_histogram,
                                 pack_lengths, pad_share)
from vltune.data.template import IGNORE_INDEX
from vltune.data.dataset import SFTDataset

from .conftest import FAMILIES


def _rows():
    red, green, blue = (Image.new("RGB", s, c) for s, c in (((64, 64), (200, 0, 0)), ((96, 64), (0, 200, 0)),
                                                            ((64, 128), (0, 0, 200))))
    return [
        {"messages": [{"role": "user", "content": "<image>Click the red circle"},
                      {"role": "assistant", "content": "click(125, 375)"}], "images": [red]},
        {"messages": [{"role": "user", "content": "<image>compare with <image>"},
                      {"role": "assistant", "content": "not trained here", "loss": False},
                      {"role": "user", "content": "and now?"},
                      {"role": "assistant", "content": "a longer answer of several words"}], "images": [green, blue]},
        {"messages": [{"role": "user", "content": "text only"}, {"role": "assistant", "content": "ok"}], "images": []},
    ]


def _features(rows):
    return [{"sample": normalize_row(r, None, f"t:{i}"), "images": list(r["images"])} for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForImageTextToText

    from vltune.models.tiny import tiny_model_path

    cache = {}

    def get(family):
        if family not in cache:
            torch.manual_seed(0)
            m = AutoModelForImageTextToText.from_pretrained(tiny_model_path(family, "xs"), attn_implementation="sdpa")
            cache[family] = m.float().train()  # use_cache stays as saved: the collator must turn it off
        return cache[family]

    return get


def _per_sample_losses_padded(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"]
    out = []
    for b in range(labels.shape[0]):
        ce = torch.nn.functional.cross_entropy(logits[b, :-1], labels[b, 1:], reduction="sum", ignore_index=-100)
        out.append(ce / (labels[b, 1:] != IGNORE_INDEX).sum())
    return torch.stack(out)


def _per_sample_losses_flat(model, batch, lengths):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels", "logits_to_keep")}
    logits = model(**inputs).logits[0]
    shift = batch["shift_labels"][0]
    out, start = [], 0
    for n in lengths:
        ce = torch.nn.functional.cross_entropy(logits[start:start + n], shift[start:start + n], reduction="sum")
        out.append(ce / (shift[start:start + n] != IGNORE_INDEX).sum())
        start += n
    return torch.stack(out), logits


@pytest.mark.parametrize("family", FAMILIES)
def test_flat_batch_same_losses_gradients_and_isolation(family, processor_for, models):
    proc, model = processor_for(family), models(family)
    feats = _features(_rows())
    padded = SFTCollator(proc)(feats)
    lengths = padded["attention_mask"].sum(1).tolist()
    flat = PaddingFreeCollator(proc, rope_index=find_rope_index(model))(feats)
    assert "attention_mask" not in flat and flat["input_ids"].shape == (1, sum(lengths))
    text_row = flat["position_ids"][0] if flat["position_ids"].dim() == 3 else flat["position_ids"]
    starts = [0] + torch.tensor(lengths).cumsum(0)[:-1].tolist()
    assert (text_row[0, starts] == 0).all() and int((text_row[0] == 0).sum()) == len(lengths)
    if family.startswith("qwen"):
        assert flat["position_ids"].shape[:2] == (4, 1)  # text row + 3-D mRoPE
    with torch.no_grad():
        ref = _per_sample_losses_padded(model, padded)
        got, logits = _per_sample_losses_flat(model, flat, lengths)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    # The loss the Trainer optimises (model's own, logits kept only where trained) and its gradients.
    keep = PaddingFreeCollator(proc, rope_index=find_rope_index(model), keep_trained_logits=True)(feats)
    assert keep["shift_labels"].shape[1] == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    grads = []
    for batch in (padded, keep):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    model.zero_grad()
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    assert grads[0][1].keys() == grads[1][1].keys() and len(grads[0][1]) > 10
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-4, atol=1e-6, msg=name)

    # Changing one sample's answer changes no logit of the other samples in the flat row.
    rows = _rows()
    rows[0]["messages"][1]["content"] = "click(999, 1)"
    rows[0]["messages"][0]["content"] = "<image>Click the big blue square now"
    changed = PaddingFreeCollator(proc, rope_index=find_rope_index(model))(_features(rows))
    n0 = int(SFTCollator(proc)(_features(rows[:1]))["attention_mask"].sum())
    with torch.no_grad():
        inputs = {k: v for k, v in changed.items() if k not in ("labels", "shift_labels")}
        other = model(**inputs).logits[0]
    torch.testing.assert_close(other[n0:], logits[lengths[0]:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other[:n0].mean(), logits[:lengths[0]].mean())


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3"])
def test_labels_inside_packs_are_assistant_only(family, processor_for):
    proc = processor_for(family)
    feats = _features(_rows())
    padded = SFTCollator(proc)(feats)
    flat = PaddingFreeCollator(proc)(feats)
    mask = padded["attention_mask"].bool()
    expected = padded["labels"].clone()
    expected[:, 0] = IGNORE_INDEX
    assert torch.equal(flat["labels"][0], expected[mask])
    tok = proc.tokenizer
    trained = flat["labels"][0] != IGNORE_INDEX
    text = tok.decode(flat["input_ids"][0][trained])
    assert "click(125, 375)" in text and "a longer answer of several words" in text and "ok" in text
    assert "not trained here" not in text and "Click the red circle" not in text  # loss: false and user turns
    # targets never cross a sample boundary: the last token of a sample predicts nothing
    ends = mask.sum(1).cumsum(0) - 1
    assert (flat["shift_labels"][0, ends] == IGNORE_INDEX).all()


def test_pack_lengths_never_splits_and_respects_capacity():
    lengths = [5, 9, 3, 7, 1, 10, 4, 6]
    packs = pack_lengths(lengths, 10)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 10 for p in packs)
    assert len(packs) == 5  # 45 tokens need at least 5 packs of 10
    with pytest.raises(ValueError, match="longer than the packing length 8"):
        pack_lengths(lengths, 8)
    ds = PackedDataset(SFTDataset([object()] * len(lengths), lengths), 10, seed=0)
    assert len(ds) == 5 and ds.fill() == pytest.approx(45 / 50)


def test_pad_share_and_histogram():
    assert pad_share([10, 10, 10, 10], 2) == 0
    assert pad_share([10, 30], 2) == pytest.approx(1 - 40 / 60)
    assert pad_share([10, 30], 1) == 0
    lines = length_histogram([10, 11, 12, 50, 90], bins=4)
    assert len(lines) == 4 and lines[0].split()[1] == "3" and lines[-1].split()[1] == "1"


def test_sft_packing_end_to_end_logs_tokens_per_step(tmp_path, tiny_path, monkeypatch):
    from vltune.recipes.sft import main

    # an import inside training (bitsandbytes' torch.compile at import) sets the inductor cache dir: undo it after
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    out = tmp_path / "out"
    res = main(["--model", tiny_path("qwen2_vl"), "--packing", "true", "--max_steps", "2", "--num_samples", "24",
                "--per_device_train_batch_size", "1", "--max_length", "256", "--output_dir", str(out),
                "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no",
                "--gradient_checkpointing", "false"])
    log = (out / "train.log").read_text()
    assert "tokens per optimizer step" in log and "packing: 24 samples in" in log
    assert res.metrics["train_loss"] > 0


def test_liger_without_package_is_one_line_exit_2(tmp_path, tiny_path, capsys, monkeypatch):
    import importlib.util

    from vltune.recipes.sft import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "liger_kernel" else real(n, *a))
    with pytest.raises(SystemExit) as e:
        main(["--model", tiny_path("qwen2_vl"), "--use_liger_kernel", "true", "--output_dir", str(tmp_path)])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vltune sft:")]
    assert len(err) == 1 and "--use_liger_kernel" in err[0] and "pip install liger-kernel" in err[0]
