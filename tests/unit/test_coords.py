"""Click coordinates per family convention: targets built and answers parsed through the same processor."""

from __future__ import annotations

import pytest

from vltune.coords import from_model_coords, parse_click, resized_size, to_model_coords
from vltune.models.load import set_pixel_bounds


def test_rel1000_round_trip():
    assert to_model_coords(320, 120, 640, 480, "rel1000") == (500, 250)
    assert from_model_coords(500, 250, 640, 480, "rel1000") == (320.0, 120.0)


def test_qwen2_5_absolute_pixels_follow_max_pixels(processor_for):
    """Qwen2.5-VL answers in pixels of the *resized* image: the same click is a different number under a
    different --max_pixels, and converting through the processor in use maps it back to the same spot."""
    proc = processor_for("qwen2_5_vl")
    w, h = 1280, 720
    saved = dict(proc.image_processor.size)
    try:
        set_pixel_bounds(proc, 200_000, None)
        small = to_model_coords(640, 360, w, h, "abs_resized", proc)
        rw, rh = resized_size(proc, w, h)
        assert rw * rh <= 200_000 and rw % 28 == 0 and rh % 28 == 0
        set_pixel_bounds(proc, 800_000, None)
        large = to_model_coords(640, 360, w, h, "abs_resized", proc)
        assert large != small
        back = from_model_coords(*large, w, h, "abs_resized", proc)
        assert back == pytest.approx((640, 360), abs=w / rw + 1)
    finally:
        proc.image_processor.size = saved


@pytest.mark.parametrize("text, expected", [
    ("click(125, 875)", (125.0, 875.0)),
    ("I will click ( 3 ,4 ) now", (3.0, 4.0)),
    ("[10, 20]", (10.0, 20.0)),
    ("no idea", None),
])
def test_parse_click(text, expected):
    assert parse_click(text) == expected
