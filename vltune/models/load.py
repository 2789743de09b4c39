"""Load any image-text-to-text model and its processor through from_pretrained."""

from __future__ import annotations

import logging
import os

import torch

from ..hardware import detect_device, resolve_dtype
from .config import ModelArguments
from .families import ModelFamily, family_for_model_type, part_of
from .tiny import tiny_model_path

logger = logging.getLogger("vltune")


def resolve_model_path(args: ModelArguments) -> str:
    """The user's --model, or the embedded tiny model of --model_family (built on first use)."""
    if args.model:
        return os.path.expanduser(args.model) if os.path.exists(os.path.expanduser(args.model)) else args.model
    path = tiny_model_path(args.model_family, args.tiny_size)
    logger.info("[model] no --model given: using the embedded tiny %s model at %s", args.model_family, path)
    return path


def base_of_adapter(path: str) -> str | None:
    """The base model a PEFT adapter directory was trained on (None if `path` is not an adapter)."""
    cfg = os.path.join(path, "adapter_config.json")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) and os.path.exists(cfg):
        import json

        with open(cfg, encoding="utf-8") as f:
            return json.load(f).get("base_model_name_or_path")
    return None


def model_family(path: str, trust_remote_code: bool = False) -> ModelFamily:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_of_adapter(path) or path, trust_remote_code=trust_remote_code)
    return family_for_model_type(getattr(config, "model_type", None))


def load_processor(path: str, max_pixels: int | None = None, min_pixels: int | None = None,
                   trust_remote_code: bool = False):
    """AutoProcessor, or the family's image-only processor where the full one cannot be built
    (Qwen-VL video processors need torchvision) or AutoProcessor silently returns a bare tokenizer."""
    from transformers import AutoProcessor
    from transformers.processing_utils import ProcessorMixin

    from .processors import IMAGE_ONLY_PROCESSORS

    family = model_family(path, trust_remote_code)
    processor, error = None, None
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError, ValueError, TypeError) as e:  # e.g. torchvision missing for video processors
        error = e
    if not isinstance(processor, ProcessorMixin) or not hasattr(processor, "image_processor"):
        if family.name not in IMAGE_ONLY_PROCESSORS:
            raise RuntimeError(
                f"could not build an image processor for {path} (AutoProcessor gave "
                f"{type(processor).__name__ if processor is not None else error!r})")
        processor = IMAGE_ONLY_PROCESSORS[family.name].from_pretrained(path)
        logger.info("[model] using the image-only %s (video processing unavailable here)", type(processor).__name__)
    set_pixel_bounds(processor, max_pixels, min_pixels)
    tok = getattr(processor, "tokenizer", None)
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return processor


def set_pixel_bounds(processor, max_pixels: int | None, min_pixels: int | None) -> None:
    """Apply --max_pixels / --min_pixels to the image processor (Qwen-VL: size = pixel counts)."""
    if not max_pixels and not min_pixels:
        return
    ip = processor.image_processor
    size = dict(getattr(ip, "size", None) or {})
    if "longest_edge" in size and "shortest_edge" in size and hasattr(ip, "merge_size"):
        if max_pixels:
            size["longest_edge"] = int(max_pixels)
            ip.max_pixels = int(max_pixels)
        if min_pixels:
            size["shortest_edge"] = int(min_pixels)
            ip.min_pixels = int(min_pixels)
        ip.size = size
    elif max_pixels and "longest_edge" in size:  # Idefics3/SmolVLM: bound on the longest edge
        edge = int(max_pixels ** 0.5)
        size["longest_edge"] = min(size["longest_edge"], edge)
        ip.size = size
        logger.info("[model] --max_pixels %d -> longest image edge %d px for %s", max_pixels, edge, type(ip).__name__)
    else:
        raise ValueError(f"--max_pixels is not supported for image processor {type(ip).__name__}")


def frozen_module_prefixes(path: str, parts: tuple[str, ...] = ("vision", "aligner"),
                           trust_remote_code: bool = False) -> list[str]:
    """Top-most module names of the given parts (from a weightless meta model), e.g. ['model.visual', 'lm_head']."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    prefixes: list[str] = []
    for name, _ in meta.named_modules():
        if name and part_of(name) in parts and not any(name.startswith(p + ".") for p in prefixes):
            prefixes.append(name)
    return prefixes


def load_model(path: str, args: ModelArguments, train_type: str = "full", quant_bits: int = 4,
               bnb_4bit_quant_type: str = "nf4", for_training: bool = True):
    """Load the model with dtype/device/attention from `args`; 4-bit base for qlora (vision tower kept full)."""
    from transformers import AutoModelForImageTextToText

    device = detect_device(args.device)
    dtype = resolve_dtype(args.torch_dtype, device)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": args.trust_remote_code}
    if args.attn_impl:
        kwargs["attn_implementation"] = args.attn_impl
    if train_type == "qlora":
        from transformers import BitsAndBytesConfig

        if quant_bits != 4:
            raise ValueError("qlora supports --quant_bits 4 (bitsandbytes nf4/fp4)")
        skip = frozen_module_prefixes(path, ("vision", "aligner"), args.trust_remote_code) + ["lm_head"]
        compute = dtype if dtype != torch.float16 or device == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=bnb_4bit_quant_type, bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True, llm_int8_skip_modules=skip,
        )
        kwargs["device_map"] = {"": device if device != "cuda" else torch.cuda.current_device()}
        logger.info("[model] qlora: 4-bit %s base; kept in %s: %s", bnb_4bit_quant_type, dtype, ", ".join(skip))
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if train_type != "qlora" and not _distributed() and device != "cpu":
        model.to(device)
    if for_training and getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    if hasattr(model, "generation_config") and model.generation_config is not None:
        model.generation_config.use_cache = True
    return model


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
