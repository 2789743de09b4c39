"""Image-only processors for the Qwen-VL families.

transformers builds the Qwen2/2.5/3-VL processors with a *video* processor that
needs torchvision. Where torchvision is missing (the CPU torch builds beside
which it does not import), `AutoProcessor.from_pretrained` fails or silently
returns a bare tokenizer. These subclasses keep everything image-related and
drop the video attribute, so image SFT/GRPO works without torchvision. They are
used only as a fallback by `vltune.models.load.load_processor`.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin


def _image_only(base):
    class ImageOnly(base):
        # ProcessorMixin discovers its sub-processors from the __init__ signature.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # The same token bookkeeping as the base __init__, without its video argument.
            for name, default in (("image", "<|image_pad|>"), ("video", "<|video_pad|>"),
                                  ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>")):
                token = getattr(tokenizer, f"{name}_token", None) or default
                setattr(self, f"{name}_token", token)
                setattr(self, f"{name}_token_id", tokenizer.convert_tokens_to_ids(token))
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnly.__name__ = ImageOnly.__qualname__ = base.__name__.replace("Processor", "ImageProcessorOnly")
    return ImageOnly


Qwen2VLImageOnlyProcessor = _image_only(Qwen2VLProcessor)
Qwen2_5_VLImageOnlyProcessor = _image_only(Qwen2_5_VLProcessor)
Qwen3VLImageOnlyProcessor = _image_only(Qwen3VLProcessor)

IMAGE_ONLY_PROCESSORS = {
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
    "qwen3_vl": Qwen3VLImageOnlyProcessor,
}

# The video processor each family's full processor expects (what a saved checkpoint must name in
# video_preprocessor_config.json, or AutoProcessor elsewhere, torchvision installed, cannot build it).
VIDEO_PROCESSOR_CLASSES = {
    "qwen2_vl": "Qwen2VLVideoProcessor",
    "qwen2_5_vl": "Qwen2VLVideoProcessor",
    "qwen3_vl": "Qwen3VLVideoProcessor",
}
