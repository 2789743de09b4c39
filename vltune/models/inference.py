"""Load a trained model for use: base weights + optional LoRA adapter + the processor it was trained with.

Shared by `vltune infer` and `vltune export`. The processor comes from the adapter directory when
`vltune sft` saved one there, so image resizing (--max_pixels) and the chat template at inference are
the ones used in training: a different resize is what makes predicted clicks drift.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import UsageError
from .config import ModelArguments
from .load import load_model, load_processor, resolve_model_path, set_pixel_bounds

logger = logging.getLogger("vltune")

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def check_adapter_dir(adapters: str) -> Path:
    path = Path(adapters).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise UsageError(f"--adapters {adapters}: no adapter_config.json there; give the --output_dir of a "
                         f"`vltune sft --train_type lora|qlora` run (or one of its checkpoint-N folders)")
    return path


def load_trained_processor(base_path: str, adapters: str | None, model_args: ModelArguments):
    """The processor saved beside the adapter if there is one, else the base model's; --max_pixels /
    --min_pixels given on the command line still win."""
    processor = load_processor(base_path, None, None, model_args.trust_remote_code)
    if adapters and any((Path(adapters) / f).is_file() for f in PROCESSOR_FILES):
        # Same class as the base's processor (it may be vltune's image-only fallback), read from the adapter dir.
        processor = type(processor).from_pretrained(adapters, trust_remote_code=model_args.trust_remote_code)
        tok = getattr(processor, "tokenizer", None)
        if tok is not None and tok.pad_token is None:
            tok.pad_token = tok.eos_token
        logger.info("[model] processor and chat template from the adapter directory %s (as in training)", adapters)
    set_pixel_bounds(processor, model_args.max_pixels, model_args.min_pixels)
    return processor


def load_for_inference(model_args: ModelArguments, adapters: str | None = None):
    """(model in eval mode, processor, base path). With `adapters`, the model is a PeftModel (not merged)."""
    path = resolve_model_path(model_args)
    if adapters:
        adapter_dir = check_adapter_dir(adapters)
        trained_on = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if trained_on and os.path.normpath(str(trained_on)) != os.path.normpath(path):
            logger.warning("[model] the adapter was trained on %s but is applied to %s (--model)", trained_on, path)
    model = load_model(path, model_args, train_type="full", for_training=False)
    if adapters:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapters)
        logger.info("[model] LoRA adapter %s on %s", adapters, path)
    model.eval()
    return model, load_trained_processor(path, adapters, model_args), path
