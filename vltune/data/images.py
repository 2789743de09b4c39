"""Image references -> PIL images, with errors that name the sample."""

from __future__ import annotations

import base64
import io
import os
from typing import Any

from PIL import Image, UnidentifiedImageError

from .errors import DataError


def describe_ref(ref: Any) -> str:
    if isinstance(ref, str):
        return ref[:60] + "..." if ref.startswith("data:") else ref
    if isinstance(ref, dict):
        return str(ref.get("path") or "<bytes>")
    return type(ref).__name__


def _open(ref: Any) -> Image.Image:
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, dict):  # HF datasets Image feature stored as {"bytes": ..., "path": ...}
        if ref.get("bytes"):
            return Image.open(io.BytesIO(ref["bytes"]))
        ref = ref.get("path")
    if isinstance(ref, (bytes, bytearray)):
        return Image.open(io.BytesIO(ref))
    if not isinstance(ref, str) or not ref:
        raise DataError(f"image reference of unsupported type {type(ref).__name__}")
    if ref.startswith("data:"):
        try:
            payload = ref.split(",", 1)[1]
            return Image.open(io.BytesIO(base64.b64decode(payload)))
        except (IndexError, ValueError) as e:
            raise DataError(f"malformed base64 data URI ({e})") from None
    if ref.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(ref, timeout=30) as r:
                return Image.open(io.BytesIO(r.read()))
        except OSError as e:
            raise DataError(f"cannot fetch image URL {ref}: {e}") from None
    if not os.path.exists(ref):
        raise DataError(f"image file not found: {ref}")
    return Image.open(ref)


# What Pillow raises for a file it cannot read. DecompressionBombError (a header declaring more than twice
# Image.MAX_IMAGE_PIXELS) is not an OSError: without it here, one such file stopped a run with a traceback.
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_image(ref: Any) -> Image.Image:
    """Fully decode an image reference to an RGB PIL image (raises DataError)."""
    try:
        img = _open(ref)
        img.load()
        return img.convert("RGB") if img.mode != "RGB" else img
    except DataError:
        raise
    except _UNREADABLE as e:
        raise DataError(f"corrupt or unreadable image {describe_ref(ref)}: {e}") from None


def image_size(ref: Any, verify: bool = True, decode: bool = False) -> tuple[int, int]:
    """(width, height) from the header. `verify` also checks the file's integrity as Pillow's `verify` does
    (PNG chunk checksums; it decodes nothing, so a JPEG cut short or PNG pixel data that does not inflate
    passes); `decode` decodes the pixels in full too, which finds those (as training would meet them)."""
    try:
        img = _open(ref)
        size = img.size
        if verify and not isinstance(ref, Image.Image):
            img.verify()
        if decode and not isinstance(ref, Image.Image):
            _open(ref).load()  # verify() leaves the image unusable: decode a fresh one
        return size
    except DataError:
        raise
    except _UNREADABLE as e:
        raise DataError(f"corrupt or unreadable image {describe_ref(ref)}: {e}") from None
