"""Training images decoded once per process and kept in memory, already at the size the processor resizes to.

A multi-epoch run meets every image once per epoch, and a screenshot set often shows one screen in several
rows. Without a cache each meeting reads the file, decodes it and has the processor resize it (a 512 px PNG
to the 128 px the tiny model sees: about 5 ms, more than half of the tiny model's forward pass per sample).
With it, that happens once per image and process; later meetings take the stored, already resized image.

Resizing ahead of the processor is only done where it leaves the pixels the model sees unchanged: the
processor then receives an image already at its target size, and its own resize is a copy. That is
checked on the first image each cache prepares (the processor run on the original and on the pre-resized
image must give equal pixel values). A processor that fails the check (another resize algorithm, a family
without Qwen-VL's smart_resize) gets decoded images only, resized by the processor as before.

The cache holds up to `max_mb` MiB of pixels per process (a DataLoader worker has its own), least recently
used first out. Only file paths are cached (not inline bytes or PIL objects, which already are in memory).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image

from .images import load_image

logger = logging.getLogger("vltune")


def resizes_like_qwen(processor) -> bool:
    """Whether the processor resizes Qwen-VL's way: smart_resize to multiples of patch x merge, in a pixel budget."""
    ip = getattr(processor, "image_processor", None)
    return ip is not None and hasattr(ip, "merge_size") and hasattr(ip, "patch_size") and getattr(ip, "do_resize", True)


def target_size(processor, width: int, height: int) -> tuple[int, int] | None:
    """(width, height) a Qwen-VL processor resizes an image of this size to; None where it refuses the size."""
    from ..coords import resized_size

    try:
        return resized_size(processor, width, height)
    except (TypeError, ValueError):  # e.g. an aspect ratio over 200: the processor's own error comes later
        return None


class ImageCache:
    """`load(ref)`: the RGB image of a reference, from memory after the first time (see the module docstring)."""

    def __init__(self, processor, max_mb: float):
        self.processor = processor
        self.max_bytes = int(max_mb * 2 ** 20)
        self._items: OrderedDict[str, Image.Image] = OrderedDict()
        self._bytes = 0
        # None: not checked yet in this process; False: this processor gets images at their own size
        self._resize_ok: bool | None = None if resizes_like_qwen(processor) else False
        self.hits = self.misses = 0

    def __getstate__(self) -> dict:  # a DataLoader worker starts with an empty cache of its own
        state = dict(self.__dict__)
        state["_items"], state["_bytes"] = OrderedDict(), 0
        return state

    @property
    def resizes(self) -> bool | None:
        """Whether images are stored pre-resized (None until the first image was checked)."""
        return self._resize_ok

    def load(self, ref: Any) -> Image.Image:
        if self.max_bytes <= 0 or not isinstance(ref, str) or ref.startswith(("data:", "http://", "https://")):
            return load_image(ref)
        img = self._items.get(ref)
        if img is not None:
            self._items.move_to_end(ref)
            self.hits += 1
            return img
        self.misses += 1
        img = self._prepare(load_image(ref))
        size = img.width * img.height * len(img.getbands())
        if size <= self.max_bytes:
            self._items[ref] = img
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.width * old.height * len(old.getbands())
        return img

    def _prepare(self, img: Image.Image) -> Image.Image:
        if self._resize_ok is False:
            return img
        size = target_size(self.processor, *img.size)
        if size is None:
            return img
        small = self._resized(img, size)
        if self._resize_ok is None:
            self._resize_ok = self._same_pixels(img, small)
            if not self._resize_ok:
                logger.info("[data] image cache: %s resizes differently from a PIL resize ahead of it: caching "
                            "decoded images at full size", type(self.processor.image_processor).__name__)
                return img
        return small

    def _resized(self, img: Image.Image, size: tuple[int, int]) -> Image.Image:
        if img.size == size:
            return img
        resample = getattr(self.processor.image_processor, "resample", Image.Resampling.BICUBIC)
        return img.resize(size, resample=Image.Resampling(int(resample)))

    def _same_pixels(self, original: Image.Image, small: Image.Image) -> bool:
        ip = self.processor.image_processor
        try:
            a, b = (np.asarray(ip(images=[im], return_tensors="np")["pixel_values"]) for im in (original, small))
        except Exception as e:  # noqa: BLE001 - a processor that cannot run on one image alone: do not pre-resize
            logger.debug("[data] image cache: no pre-resize check for %s (%s)", type(ip).__name__, e)
            return False
        return a.shape == b.shape and np.array_equal(a, b)

    def describe(self) -> str:
        seen = self.hits + self.misses
        return (f"{len(self._items)} image(s), {self._bytes / 2 ** 20:.0f} of {self.max_bytes / 2 ** 20:.0f} MiB, "
                f"{self.hits}/{seen} loads from memory"
                + (", stored at the processor's size" if self._resize_ok else ""))
