"""vltune export: turn training outputs into checkpoints that plain `transformers` / `peft` load.

    vltune export --model Qwen/Qwen3-VL-8B-Instruct --adapters out/global_lora --merge_lora --output_dir out/merged
    vltune export --deepspeed_to_fp32 out/run/checkpoint-500 --output_dir out/run-fp32
    vltune export --adapters output/sft --merge_lora --output_dir output/merged      # tiny model, offline

--merge_lora folds the LoRA adapter into the base weights and writes safetensors + config + generation
config + processor and chat template: `AutoModelForImageTextToText.from_pretrained(out)` and
`AutoProcessor.from_pretrained(out)` load it without vltune, and greedy answers equal base + adapter.
The merged weights keep the base checkpoint's dtype unless --torch_dtype says otherwise.

--deepspeed_to_fp32 consolidates the ZeRO-2/3 shards of a Trainer checkpoint (checkpoint-N, holding
`latest` and global_stepN/) into fp32 safetensors with DeepSpeed's own zero_to_fp32 (pip install
'vltune[deepspeed]'). A full fine-tuning checkpoint becomes a model directory (config, processor copied
beside); a LoRA checkpoint becomes an fp32 adapter directory (adapter_model.safetensors + adapter_config.json),
loadable with `PeftModel.from_pretrained` or merged with --merge_lora.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..args import ModelArguments, parse_args
from ..console import setup_logging
from ..errors import UsageError

logger = logging.getLogger("vltune")

# Non-weight files of a checkpoint that a loadable model / adapter directory needs beside its weights.
COMPANION_FILES = ("config.json", "generation_config.json", "adapter_config.json", "processor_config.json",
                   "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")


@dataclass
class ExportArguments:
    output_dir: str | None = field(default=None, metadata={
        "help": "Where to write the exported checkpoint (required)."})
    adapters: str | None = field(default=None, metadata={
        "help": "LoRA adapter directory to merge (the --output_dir of `vltune sft --train_type lora|qlora`)."})
    merge_lora: bool = field(default=False, metadata={
        "help": "Merge --adapters into --model and save a standalone model (no peft needed to load it)."})
    deepspeed_to_fp32: str | None = field(default=None, metadata={
        "help": "A DeepSpeed ZeRO checkpoint directory (checkpoint-N of a --deepspeed run) to consolidate to fp32."})
    tag: str | None = field(default=None, metadata={
        "help": "ZeRO checkpoint tag (e.g. global_step500); default: the one named in the checkpoint's `latest` file."})
    max_shard_size: str = field(default="5GB", metadata={
        "help": "Split the weights into safetensors files of at most this size."})


# ---------------------------------------------------------------------------- merge LoRA
def standard_processor_class(cls: type) -> str:
    """Name of the first class in `cls`'s hierarchy that transformers itself defines.

    Without torchvision vltune falls back to image-only subclasses of the Qwen-VL processors; a checkpoint
    must name the transformers class, or `AutoProcessor` elsewhere cannot resolve it.
    """
    import transformers

    for base in cls.__mro__:
        if getattr(transformers, base.__name__, None) is base:
            return base.__name__
    return cls.__name__


def standardize_processor_class(out: Path) -> None:
    """Rewrite `processor_class` in the saved processor / tokenizer configs from vltune's image-only fallback
    classes to the transformers class they extend (Qwen3VLImageProcessorOnly -> Qwen3VLProcessor)."""
    from ..models.processors import IMAGE_ONLY_PROCESSORS

    renames = {cls.__name__: standard_processor_class(cls) for cls in IMAGE_ONLY_PROCESSORS.values()}
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = out / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("processor_class") in renames:
            logger.info("[export] %s: processor_class %s -> %s", name, data["processor_class"],
                        renames[data["processor_class"]])
            data["processor_class"] = renames[data["processor_class"]]
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_video_processor_config(out: Path, processor) -> None:
    """Where vltune saved an image-only processor (no torchvision here), also write the video processor config
    the family's full processor needs, from the image processor's settings: with it, `AutoProcessor` loads the
    export without vltune wherever torchvision is installed (without torchvision, transformers cannot build any
    Qwen-VL processor, the hub originals included, and says so)."""
    from ..models.processors import IMAGE_ONLY_PROCESSORS, VIDEO_PROCESSOR_CLASSES

    family = next((f for f, cls in IMAGE_ONLY_PROCESSORS.items() if type(processor) is cls), None)
    target = out / "video_preprocessor_config.json"
    if family is None or target.exists():
        return
    image = processor.image_processor
    keys = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "do_rescale",
            "rescale_factor", "do_normalize", "do_convert_rgb", "resample")
    config = {k: getattr(image, k) for k in keys if getattr(image, k, None) is not None}
    config.update(video_processor_type=VIDEO_PROCESSOR_CLASSES[family],
                  processor_class=standard_processor_class(type(processor)))
    target.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    logger.info("[export] wrote %s (%s) for AutoProcessor", target.name, config["video_processor_type"])


_IMAGE_ONLY_NOTE = (" (trust_remote_code loads processing_image_only.py, an image-only processor that needs no "
                    "torchvision; with torchvision installed, `AutoProcessor.from_pretrained` without it loads "
                    "transformers' own processor)")


def ship_image_only_processor(out: Path, processor) -> None:
    """Where vltune saved an image-only processor (no torchvision here), copy its one-file definition
    (vltune/models/processing_image_only.py, which imports only transformers) into the export and name it in
    processor_config.json's `auto_map`: `AutoProcessor.from_pretrained(out, trust_remote_code=True)` then loads
    the export here, without vltune or torchvision. Without `trust_remote_code`, transformers keeps loading its
    own full processor (the `processor_class`), as it does wherever torchvision is installed."""
    import shutil

    from ..models import processing_image_only
    from ..models.processors import IMAGE_ONLY_PROCESSORS

    if type(processor) not in IMAGE_ONLY_PROCESSORS.values():
        return
    module = Path(processing_image_only.__file__)
    shutil.copyfile(module, out / module.name)
    config_path = out / "processor_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config.setdefault("auto_map", {})["AutoProcessor"] = f"{module.stem}.{type(processor).__name__}"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("[export] no torchvision here: %s ships %s (AutoProcessor.from_pretrained(..., "
                "trust_remote_code=True) loads it without torchvision)", out, module.name)


def _checkpoint_dtype(path: str, trust_remote_code: bool) -> str:
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "dtype", None)
    return str(dtype).replace("torch.", "") if dtype is not None else "float32"


def merge_lora(model_args: ModelArguments, args: ExportArguments) -> Path:
    from ..models.inference import check_adapter_dir, load_for_inference
    from ..models.load import resolve_model_path

    if not args.adapters:
        raise UsageError("vltune export --merge_lora: give the adapter to merge with --adapters DIR")
    check_adapter_dir(args.adapters)
    if model_args.torch_dtype == "auto":  # keep the base's precision: a bf16 8B model stays 16 GB, not 32
        model_args.model = resolve_model_path(model_args)  # resolved (and logged) once
        model_args.torch_dtype = _checkpoint_dtype(model_args.model, model_args.trust_remote_code)
    model, processor, base = load_for_inference(model_args, args.adapters)
    merged = model.merge_and_unload()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, max_shard_size=args.max_shard_size)
    processor.save_pretrained(out)
    standardize_processor_class(out)
    write_video_processor_config(out, processor)
    ship_image_only_processor(out, processor)
    (out / "README.md").write_text(
        f"# Merged by vltune export\n\n- base model: `{base}`\n- LoRA adapter: `{args.adapters}`\n"
        f"- dtype: {model_args.torch_dtype}\n\nLoad with `AutoModelForImageTextToText.from_pretrained('{out}')` "
        f"and `AutoProcessor.from_pretrained('{out}'"
        f"{', trust_remote_code=True' if (out / 'processing_image_only.py').exists() else ''})`"
        f"{_IMAGE_ONLY_NOTE if (out / 'processing_image_only.py').exists() else ''}.\n", encoding="utf-8")
    logger.info("[export] merged %s into %s -> %s", args.adapters, base, out)
    return out


# ---------------------------------------------------------------------------- ZeRO -> fp32
def _peft_key(key: str, adapter_name: str) -> str:
    """PEFT's saved name of a parameter: the adapter name dropped (`lora_A.default.weight` -> `lora_A.weight`)."""
    return re.sub(rf"\.{re.escape(adapter_name)}(?=\.|$)", "", key)


def _adapter_name(keys) -> str:
    names = {m.group(1) for k in keys if (m := re.search(r"\.lora_(?:A|B|embedding_A|embedding_B)\.([^.]+)", k))}
    if len(names) != 1:
        raise UsageError(f"vltune export: expected the LoRA tensors of one adapter in the checkpoint, "
                         f"found adapters {sorted(names)}")
    return names.pop()


def _unique_tensors(state: dict) -> dict:
    """Drop the aliases of shared parameters (tied embeddings: lm_head.weight is embed_tokens.weight), keeping
    the first name, which is the tied source. safetensors refuses shared tensors, and from_pretrained re-ties
    them from the config."""
    seen: dict[int, str] = {}
    unique = {}
    for name, tensor in state.items():
        if id(tensor) in seen:
            logger.info("[export] %s is tied to %s: stored once", name, seen[id(tensor)])
            continue
        seen[id(tensor)] = name
        unique[name] = tensor
    return unique


def _save_sharded(state: dict, out: Path, max_shard_size: str) -> None:
    """Write lazy ZeRO tensors as model(-0000k-of-0000n).safetensors (+ index), one shard in memory at a time."""
    import torch
    from deepspeed.utils.zero_to_fp32 import to_torch_tensor
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    empty = to_torch_tensor(state, return_empty_tensor=True, dtype=torch.float32)  # shapes only, for the split
    split = split_torch_state_dict_into_shards(empty, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        shard = to_torch_tensor({n: state[n] for n in names}, dtype=torch.float32)  # frozen params may be bf16
        save_file({n: t.contiguous() for n, t in shard.items()}, str(out / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def deepspeed_to_fp32(args: ExportArguments) -> Path:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor
    except ImportError as e:
        raise UsageError(f"vltune export --deepspeed_to_fp32 needs DeepSpeed: pip install 'vltune[deepspeed]' ({e})")
    import torch
    from safetensors.torch import save_file

    ckpt = Path(args.deepspeed_to_fp32).expanduser()
    tag = args.tag or ((ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else None)
    if tag is None or not (ckpt / tag).is_dir():
        raise UsageError(f"vltune export --deepspeed_to_fp32 {ckpt}: no ZeRO checkpoint there (expected a `latest` "
                         f"file naming a global_stepN/ folder); point at a checkpoint-N folder of a --deepspeed run "
                         f"or pass --tag")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    is_adapter = (ckpt / "adapter_config.json").is_file()
    # lazy: each tensor is assembled from the rank partitions only when its shard is written, not all at once
    state = _unique_tensors(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag, lazy_mode=True))
    if is_adapter:
        # ZeRO keeps PEFT's in-memory names (with the adapter name); PeftModel.from_pretrained wants saved names.
        name = _adapter_name(state)
        tensors = to_torch_tensor(state, dtype=torch.float32)
        save_file({_peft_key(k, name): v.contiguous() for k, v in tensors.items()},
                  str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        _save_sharded(state, out, args.max_shard_size)
    for name in COMPANION_FILES:
        if (ckpt / name).is_file() and not (is_adapter and name in ("config.json", "generation_config.json")):
            shutil.copy2(ckpt / name, out / name)
    standardize_processor_class(out)
    kind = "LoRA adapter" if is_adapter else "model"
    logger.info("[export] ZeRO checkpoint %s (%s) -> fp32 %s in %s", ckpt, tag, kind, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    model_args, args = parse_args((ModelArguments, ExportArguments), argv, prog="vltune export", description=__doc__)
    setup_logging()
    if not args.output_dir:
        raise UsageError("vltune export: give --output_dir")
    if args.merge_lora == bool(args.deepspeed_to_fp32):
        raise UsageError("vltune export: choose one of --merge_lora (with --adapters) or --deepspeed_to_fp32 CKPT_DIR")
    if args.deepspeed_to_fp32:
        return deepspeed_to_fp32(args)
    return merge_lora(model_args, args)
