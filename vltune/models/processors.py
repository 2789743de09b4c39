"""The Qwen-VL processors vltune falls back to without torchvision, by family (see processing_image_only.py)."""

from __future__ import annotations

from .processing_image_only import (
    Qwen2_5_VLImageProcessorOnly,
    Qwen2VLImageProcessorOnly,
    Qwen3VLImageProcessorOnly,
)

IMAGE_ONLY_PROCESSORS = {
    "qwen2_vl": Qwen2VLImageProcessorOnly,
    "qwen2_5_vl": Qwen2_5_VLImageProcessorOnly,
    "qwen3_vl": Qwen3VLImageProcessorOnly,
}

# The video processor each family's full processor expects (what a saved checkpoint must name in
# video_preprocessor_config.json, or AutoProcessor elsewhere, torchvision installed, cannot build it).
VIDEO_PROCESSOR_CLASSES = {
    "qwen2_vl": "Qwen2VLVideoProcessor",
    "qwen2_5_vl": "Qwen2VLVideoProcessor",
    "qwen3_vl": "Qwen3VLVideoProcessor",
}
