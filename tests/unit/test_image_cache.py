"""The in-memory image cache gives the processor exactly the pixels it would have got, and reads each file once."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from vltune.data import dataset as dataset_module
from vltune.data.dataset import SFTCollator, SFTDataset, validate_samples
from vltune.data.formats import read_dataset
from vltune.data.image_cache import ImageCache
from vltune.data.images import load_image
from vltune.models.load import load_processor

SIZES = [(512, 512), (300, 700), (1000, 180), (64, 48), (33, 97)]


@pytest.fixture
def screens(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        p = tmp_path / f"s{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _pixels(processor, images):
    return np.asarray(processor.image_processor(images=images, return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl", "idefics3"])
def test_cached_images_give_the_processor_the_same_pixels(family, tiny_path, screens):
    processor = load_processor(tiny_path(family), max_pixels=128 * 128)  # resizes most of SIZES
    cache = ImageCache(processor, 64)
    for path in screens:
        first = cache.load(path)
        assert np.array_equal(_pixels(processor, [first]), _pixels(processor, [load_image(path)])), path
        assert cache.load(path) is first  # the second meeting comes from memory
    assert (cache.hits, cache.misses) == (len(screens), len(screens))
    if family == "idefics3":  # not Qwen-VL's resize: stored at full size
        assert cache.resizes is False and first.size == SIZES[-1]
    else:  # stored at the processor's size: a 512 px screen takes a fraction of its memory
        assert cache.resizes is True
        assert cache.load(screens[0]).width * cache.load(screens[0]).height < 512 * 512


def test_a_resize_that_would_change_the_pixels_is_not_used(tiny_path, screens, monkeypatch):
    processor = load_processor(tiny_path("qwen3_vl"), max_pixels=128 * 128)
    cache = ImageCache(processor, 64)
    monkeypatch.setattr(cache, "_resized", lambda img, size: img.resize(size, Image.Resampling.NEAREST))
    img = cache.load(screens[0])
    assert cache.resizes is False and img.size == SIZES[0]
    assert np.array_equal(_pixels(processor, [img]), _pixels(processor, [load_image(screens[0])]))


def test_least_recently_used_images_leave_when_the_budget_is_full(processor_for, screens):
    cache = ImageCache(processor_for("idefics3"), 1.2)  # full-size images: 512 x 512 x 3 = 0.75 MiB
    a, b = cache.load(screens[0]), cache.load(screens[1])  # 0.75 + 0.6 MiB > 1.2: the first one leaves
    assert cache.load(screens[1]) is b and cache.load(screens[0]) is not a
    assert cache._bytes <= cache.max_bytes


def test_only_files_are_cached_and_zero_turns_it_off(processor_for, screens):
    processor = processor_for("qwen3_vl")
    inline = Image.open(screens[1])
    cache = ImageCache(processor, 64)
    assert cache.load(inline) is inline or cache.load(inline).size == inline.size
    assert cache.misses == 0 and cache.hits == 0
    off = ImageCache(processor, 0)
    assert off.load(screens[0]).size == SIZES[0] and off.load(screens[0]) is not off.load(screens[0])


def test_a_dataloader_worker_starts_with_an_empty_cache(processor_for, screens):
    cache = ImageCache(processor_for("qwen3_vl"), 64)
    cache.load(screens[0])
    copy = pickle.loads(pickle.dumps(cache))
    assert copy._bytes == 0 and not copy._items and copy.max_bytes == cache.max_bytes


def test_the_collated_batch_is_the_same_with_the_cache(processor_for, tmp_path, screens):
    rows = [{"messages": [{"role": "user", "content": f"<image>Open app {i}"},
                          {"role": "assistant", "content": f"click({i}, {2 * i})"}], "images": [path]}
            for i, path in enumerate(screens[:4] * 2)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, _ = read_dataset(str(data))
    processor = processor_for("qwen3_vl")
    collate = SFTCollator(processor)
    plain = SFTDataset(samples)
    cached = SFTDataset(samples, image_cache=ImageCache(processor, 64))
    for _ in range(2):  # the second pass comes from memory
        a, b = collate([plain[i] for i in range(len(samples))]), collate([cached[i] for i in range(len(samples))])
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def test_validation_reads_a_screen_shown_in_several_samples_once(processor_for, tmp_path, screens, monkeypatch):
    missing = str(tmp_path / "gone.png")
    rows = [{"messages": [{"role": "user", "content": "<image>Open it"}, {"role": "assistant", "content": "ok"}],
             "images": [path]} for path in [screens[0], screens[1], screens[0], missing, screens[1], missing]]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, _ = read_dataset(str(data))
    calls = []
    real = dataset_module.image_size
    monkeypatch.setattr(dataset_module, "image_size", lambda ref, **kw: calls.append(ref) or real(ref, **kw))
    kept, lengths, report = validate_samples(samples, processor_for("qwen3_vl"), None)
    assert sorted(calls) == sorted([screens[0], screens[1], missing])
    assert len(kept) == 4 and report.skipped == 2  # both samples of the missing file are reported, each at its line
    assert lengths[0] == lengths[2] and lengths[1] == lengths[3]
