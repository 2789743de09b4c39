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


def load_image(ref: Any) -> Image.Image:
    """Fully decode an image reference to an RGB PIL image (raises DataError)."""
    try:
        img = _open(ref)
        img.load()
        return img.convert("RGB") if img.mode != "RGB" else img
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable image {describe_ref(ref)}: {e}") from None


def image_size(ref: Any, verify: bool = True) -> tuple[int, int]:
    """(width, height) from the header, without decoding pixels; `verify` checks file integrity."""
    try:
        img = _open(ref)
        size = img.size
        if verify and not isinstance(ref, Image.Image):
            img.verify()
        return size
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable image {describe_ref(ref)}: {e}") from None
