"""Multi-process training: DeepSpeed presets for `--deepspeed`, FSDP2 presets for `--fsdp`.

Launch lines (the recipe itself is unchanged; Trainer + accelerate do DDP / ZeRO):

    torchrun --nproc_per_node 8 -m vltune sft ...                           # DDP, one node
    accelerate launch --multi_gpu --num_processes 8 -m vltune sft ...       # the same through accelerate
    torchrun --nproc_per_node 8 -m vltune sft --deepspeed zero2 ...         # ZeRO-2 (pip install 'vltune[deepspeed]')
    accelerate launch --num_processes 8 -m vltune sft --fsdp fsdp2 ...      # FSDP2 (PyTorch; no extra package)
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 -m vltune sft ...

`--deepspeed` takes a preset name (`zero2`, `zero3`, `zero2_offload`, `zero3_offload`, as in ms-swift) or a
DeepSpeed JSON file. A preset becomes a config dict whose batch size, accumulation, clipping, precision and
optimizer hyper-parameters are "auto": the Trainer fills them from the command line (`--per_device_train_batch_size`,
`--gradient_accumulation_steps`, `--max_grad_norm`, `--bf16`, `--learning_rate`, ...), so the two cannot disagree.

The per-rank debug dump (`$VLTUNE_DEBUG_DIST_DIR`) is in vltune/train/debug.py.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os

from .errors import UsageError

logger = logging.getLogger("vltune")

# ---------------------------------------------------------------------------- DeepSpeed presets
_AUTO_TOP = {
    # "auto" = filled by transformers' HfTrainerDeepSpeedConfig from TrainingArguments.
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
             "hysteresis": 2, "min_loss_scale": 1},
    "steps_per_print": 1_000_000_000,  # Trainer logs; DeepSpeed's own step prints would only duplicate them
    "wall_clock_breakdown": False,
}
# With optimizer offload DeepSpeed runs the optimizer step on the CPU; its fused CPU Adam is much faster
# than torch's, so the offload presets name it (lr, betas, eps, weight decay still come from the CLI).
_OFFLOAD_OPTIMIZER = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
_ZERO = {
    2: {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
        "allgather_partitions": True, "allgather_bucket_size": 200_000_000, "reduce_bucket_size": "auto"},
    3: {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1_000_000_000,
        "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1_000_000_000,
        "stage3_max_reuse_distance": 1_000_000_000,
        # Without it, save_model() under ZeRO-3 writes empty placeholders instead of the weights.
        "stage3_gather_16bit_weights_on_model_save": True},
}
DEEPSPEED_PRESETS = {
    "zero2": "ZeRO-2: optimizer states and gradients sharded across ranks",
    "zero3": "ZeRO-3: parameters sharded too (largest models; more communication)",
    "zero2_offload": "ZeRO-2 with optimizer states in CPU memory (less GPU memory, slower steps)",
    "zero3_offload": "ZeRO-3 with parameters and optimizer states in CPU memory (least GPU memory, slowest)",
}


def deepspeed_config(preset: str) -> dict:
    """The DeepSpeed config dict of a preset (`zero2`, `zero3`, `zero2_offload`, `zero3_offload`).

    Entries that mirror a training argument are "auto", so transformers fills them from the command line.
    """
    if preset not in DEEPSPEED_PRESETS:
        raise ValueError(f"unknown DeepSpeed preset {preset!r}; choose one of {', '.join(DEEPSPEED_PRESETS)} "
                         f"or give a DeepSpeed JSON file")
    stage = 3 if preset.startswith("zero3") else 2
    config = copy.deepcopy(_AUTO_TOP)
    zero = copy.deepcopy(_ZERO[stage])
    if preset.endswith("_offload"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        config["optimizer"] = copy.deepcopy(_OFFLOAD_OPTIMIZER)
    config["zero_optimization"] = zero
    return config


def resolve_deepspeed(value):
    """A `--deepspeed` value -> what `TrainingArguments.deepspeed` takes: a preset name becomes its config
    dict; a dict or an existing JSON file passes through; anything else is an error naming the choices."""
    if isinstance(value, dict):
        return value
    if value is None or str(value).lower() in ("", "none", "false"):
        return None
    value = str(value)
    if value in DEEPSPEED_PRESETS:
        config = deepspeed_config(value)
    elif os.path.isfile(os.path.expanduser(value)):
        config = os.path.expanduser(value)
    else:
        raise UsageError(f"--deepspeed {value}: not a preset ({', '.join(DEEPSPEED_PRESETS)}) and no such JSON file")
    if importlib.util.find_spec("deepspeed") is None:
        raise UsageError(f"--deepspeed {value} needs the deepspeed package: pip install 'vltune[deepspeed]' "
                         f"(or drop --deepspeed to train with plain DDP)")
    return config


def expand_deepspeed_preset(argv: list[str], defaults: dict, known: set[str]) -> tuple[list[str], dict]:
    """Hook for `args.parse_args`: move `--deepspeed PRESET` (command line or config file) into the parser
    defaults as a config dict.

    It must happen before the arguments are built: `TrainingArguments.__post_init__` already loads
    `deepspeed` as a file path or dict, and a preset name is neither. The last `--deepspeed` wins, like argparse.
    """
    if "deepspeed" not in known:
        return argv, defaults
    value, rest = _take_flag(argv, "deepspeed", defaults.get("deepspeed"))
    if value is None:
        return argv, defaults
    defaults = dict(defaults)
    defaults["deepspeed"] = resolve_deepspeed(value)
    return rest, defaults


def _take_flag(argv: list[str], name: str, value=None) -> tuple[object, list[str]]:
    """(last value of `--name V` / `--name=V` in argv, or `value`; argv without those flags)."""
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{name}" and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest


# ---------------------------------------------------------------------------- FSDP2 presets
# `--fsdp fsdp2` beside `--deepspeed zero3`: parameters, gradients and optimizer states sharded across ranks by
# PyTorch's FSDP2 (through accelerate), each decoder layer wrapped on its own (the model's `_no_split_modules`).
# Checkpoints are saved as one full state dict, so `vltune export` and from_pretrained read them as usual.
FSDP_PRESETS = {
    "fsdp2": "FSDP2 full sharding (like ZeRO-3), layers resharded after forward",
    "fsdp2_offload": "FSDP2 with parameters, gradients and optimizer states in CPU memory (least GPU memory)",
}


def fsdp_config(preset: str) -> dict:
    """The `fsdp_config` dict of an FSDP2 preset (`fsdp2`, `fsdp2_offload`)."""
    if preset not in FSDP_PRESETS:
        raise UsageError(f"--fsdp {preset}: not a preset ({', '.join(FSDP_PRESETS)}); or give "
                         f"--fsdp_config FILE.json")
    config = {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
              "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False}
    if preset.endswith("_offload"):
        config["cpu_offload"] = True
    return config


def expand_fsdp_preset(argv: list[str], defaults: dict, known: set[str]) -> tuple[list[str], dict]:
    """Hook for `args.parse_args`: `--fsdp fsdp2` -> `fsdp=True` + the preset's `fsdp_config` (an
    explicit `--fsdp_config` wins). Other `--fsdp` values pass through to transformers unchanged."""
    if "fsdp" not in known:
        return argv, defaults
    value, rest = _take_flag(argv, "fsdp", defaults.get("fsdp"))
    if value not in FSDP_PRESETS:
        if isinstance(value, str) and value.startswith("fsdp2"):
            fsdp_config(value)  # a misspelt preset: name the choices
        return argv, defaults
    defaults = dict(defaults)
    defaults["fsdp"] = True
    defaults.setdefault("fsdp_config", fsdp_config(value))
    return rest, defaults
