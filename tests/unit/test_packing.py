"""Padding-free batches and packing without a model: labels inside a flat row, bin-packing, pad share."""

from __future__ import annotations

import pytest
import torch

from vltune.data.dataset import SFTCollator, SFTDataset
from vltune.data.packing import PackedDataset, PaddingFreeCollator, length_histogram, pack_lengths, pad_share
from vltune.data.template import IGNORE_INDEX

from tests.helpers import packing_features, packing_rows


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3"])
def test_labels_inside_packs_are_assistant_only(family, processor_for):
    proc = processor_for(family)
    feats = packing_features(packing_rows())
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
