"""Image-only processors for the Qwen2/2.5/3-VL families, importing nothing but transformers.

transformers builds the Qwen-VL processors with a *video* processor that needs torchvision. Where torchvision is
missing (the CPU torch builds beside which it does not import), `AutoProcessor.from_pretrained` of any Qwen-VL
checkpoint, the hub originals included, fails or silently returns a bare tokenizer. These subclasses keep
everything image-related and drop the video attribute, so image SFT/GRPO/inference work without torchvision.

vltune uses them as a fallback (vltune.models.load.load_processor). `vltune export` copies this file into the
exported directory and names it in processor_config.json's `auto_map`, so that
`AutoProcessor.from_pretrained(export_dir, trust_remote_code=True)` loads the export without vltune and without
torchvision; without `trust_remote_code` transformers loads its own full processor (torchvision needed).
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin


def _image_only(base):
    class ImageOnly(base):
        # ProcessorMixin discovers its sub-processors from the __init__ signature: no video_processor here.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # The same token bookkeeping as the base __init__, without its video argument.
            for name, default in (("image", "<|image_pad|>"), ("video", "<|video_pad|>"),
                                  ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>")):
                token = getattr(tokenizer, f"{name}_token", None) or default
                setattr(self, f"{name}_token", token)
                setattr(self, f"{name}_token_id", tokenizer.convert_tokens_to_ids(token))
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnly.__name__ = ImageOnly.__qualname__ = base.__name__.replace("Processor", "ImageProcessorOnly")
    ImageOnly.__module__ = __name__
    return ImageOnly


Qwen2VLImageProcessorOnly = _image_only(Qwen2VLProcessor)
Qwen2_5_VLImageProcessorOnly = _image_only(Qwen2_5_VLProcessor)
Qwen3VLImageProcessorOnly = _image_only(Qwen3VLProcessor)
