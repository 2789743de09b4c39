"""Typed arguments, config files and the seeds' spellings.

Every command's arguments are dataclasses (model, tuner, data, plus HF
`TrainingArguments`). They are filled from `--config file.yaml|json` first and
then from the command line, which wins. Names follow ms-swift; the spellings of
the seeds' scripts (`--tuner_type`, `--use_flash_attention`, `--use_wandb`,
`--lora_r`, `--num_epochs`, ...) are accepted as aliases.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from .arg_checks import check_values
from .errors import UsageError
from .hardware import detect_device, resolve_dtype
from .models.config import ModelArguments, TunerArguments  # noqa: F401  (argument groups of every command)

logger = logging.getLogger("vltune")


# ---------------------------------------------------------------- argument groups
# ModelArguments and TunerArguments are the models layer's own config (vltune/models/config.py).


@dataclass
class DataArguments:
    dataset: list[str] = field(default_factory=list, metadata={
        "help": "Training data: ms-swift JSONL, ShareGPT/LLaVA JSON, TRL content-list JSONL, a datasets "
                "save_to_disk dir or .parquet, or a per-user pickle dir (user_<id>.pkl). Several may be given. "
                "Default: the demo's synthetic grounding set."})
    val_dataset: list[str] = field(default_factory=list, metadata={"help": "Validation data, same formats."})
    split_dataset_ratio: float = field(default=0.0, metadata={
        "help": "Hold out this fraction of --dataset for validation when --val_dataset is not given."})
    users: str | None = field(default=None, metadata={
        "help": "User ids to read from a per-user data set, e.g. '11-83' or '1,3,5-7'."})
    allow_pickle: bool = field(default=False, metadata={
        "help": "Allow reading per-user .pkl files. Unpickling runs code from the file: only for data you trust."})
    max_length: int = field(default=2048, metadata={
        "help": "Maximum tokens per sample, image tokens included. Longer samples are dropped and counted, never "
                "truncated (truncation through an image breaks the model's image/token alignment)."})
    strict: bool = field(default=False, metadata={
        "help": "Stop before training if any sample is invalid or over-long, instead of skipping and counting it."})
    num_samples: int | None = field(default=None, metadata={"help": "Use only the first N training samples."})


@dataclass
class SFTDataArguments(DataArguments):
    """The data flags of supervised fine-tuning (sft, personalize): which tokens train, and how samples are batched.
    `vltune grpo` samples its own completions, so it has none of them."""

    loss_scale: str = field(default="default", metadata={"choices": ["default", "last_round"],
        "help": "default: train on every assistant turn; last_round: only the final assistant turn. A message "
                "with \"loss\": false is never trained."})
    train_separator: bool = field(default=False, metadata={
        "help": "Also train the newline the chat template writes after each trained end-of-turn token "
                "(`<|im_end|>\\n`), as ms-swift, LLaMA-Factory and TRL do: their step losses then equal vltune's "
                "on the same batches. Off by default: that token is never generated (the README says what it "
                "measured)."})
    packing: bool = field(default=False, metadata={
        "help": "Bin-pack samples into packs of up to --packing_length tokens (a sample, and so an image, is never "
                "split) and train on --per_device_train_batch_size packs per step, flattened into one row without "
                "padding. Samples never attend to each other and their positions restart (mRoPE-aware); works with "
                "sdpa, eager and flash_attention_2. Fewer, fuller steps: the log states tokens per optimizer step, "
                "scale the learning rate to it."})
    packing_length: int | None = field(default=None, metadata={
        "help": "Token capacity of one pack (default: --max_length). Samples longer than it are dropped and counted."})
    padding_free: bool = field(default=False, metadata={
        "help": "Keep the usual batches of samples but flatten each into one row without padding (same "
                "guarantees as --packing: no attention across samples, positions restart per sample)."})


def default_output_dir(command: str):
    """The default_factory of every command's --output_dir: `output/<command>`."""
    return lambda: f"output/{command}"


@dataclass
class RunSafetyArguments:
    """What every training command does with an output directory that holds a run, and with non-finite losses
    (vltune/train/survive.py). Mixed into each command's TrainingArguments."""

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Train into an --output_dir that holds a previous run (checkpoint-N/, trainer_state.json): its "
                "checkpoints, train.log, args.json, TensorBoard runs/ and appended logs are deleted first. Without it "
                "(and without --resume_from_checkpoint) such a directory is refused, so a second run never mixes "
                "into the first."})
    nonfinite: str = field(default="stop", metadata={"choices": ["stop", "skip"],
        "help": "A NaN/inf loss or gradient norm: stop (the error names the step and its samples; the last complete "
                "checkpoint is kept) | skip (that step leaves the weights and optimizer untouched, counted; the run "
                "stops once more than --max_nonfinite_steps were skipped)."})
    max_nonfinite_steps: int = field(default=10, metadata={
        "help": "With --nonfinite skip: the most steps that may be skipped before the run stops."})


@dataclass
class SFTTrainingArguments(RunSafetyArguments, TrainingArguments):
    """HF TrainingArguments with defaults for VLM fine-tuning (ms-swift-like)."""

    output_dir: str | None = field(default_factory=default_output_dir("sft"), metadata={"help": "Where to write everything."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (1e-4 suits LoRA; ~1e-5 full)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training data."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Samples per device per step."})
    gradient_checkpointing: bool | None = field(default=True, metadata={
        "help": "Recompute activations in backward: much less memory, somewhat slower. Non-reentrant by default."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=500, metadata={"help": "Save a checkpoint-N every N steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most this many checkpoints."})
    warmup_steps: float = field(default=0, metadata={"help": "Linear warm-up steps (or a ratio if < 1)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "linear | cosine | constant ..."})
    report_to: list[str] | None = field(default_factory=lambda: ["tensorboard"], metadata={
        "help": "tensorboard | wandb | swanlab | none (several allowed)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep raw columns for the collator."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loading worker processes."})
    image_cache_mb: float = field(default=1024, metadata={
        "help": "MiB of decoded training images kept in memory per process (and per DataLoader worker), least "
                "recently used out first; 0: off. A cached image file is read and decoded once per run instead of "
                "once per epoch, and stored at the size the processor resizes it to where that gives the "
                "processor the same pixels (Qwen-VL, checked on the first image)."})
    wandb_project: str | None = field(default=None, metadata={"help": "W&B project (sets WANDB_PROJECT)."})


# ---------------------------------------------------------------- seeds' spellings
# alias -> canonical name (same value)
ALIASES: dict[str, str] = {
    "tuner_type": "train_type",
    "lora_r": "lora_rank",
    "num_epochs": "num_train_epochs",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "lr": "learning_rate",
    "attn_implementation": "attn_impl",
    "dtype": "torch_dtype",
    "model_name_or_path": "model",
    "model_id": "model",
    "output": "output_dir",
}
FLAG_ALIASES = {
    # flag -> (canonical name, value when set)
    "use_flash_attention": ("attn_impl", "flash_attention_2"),
    "use_wandb": ("report_to", "wandb"),
    "use_tensorboard": ("report_to", "tensorboard"),
}


def _truthy(v: Any) -> bool:
    return str(v).lower() in ("1", "true", "yes", "y", "on")


def apply_aliases(cfg: dict, known: set[str] | None = None) -> dict:
    """Map the seeds' / older ms-swift spellings in a config dict onto our names (a name the
    command itself defines, e.g. the demo's `epochs`, is never treated as an alias)."""
    out = {}
    for key, value in cfg.items():
        if known is not None and key in known:
            out[key] = value
        elif key in ALIASES:
            out.setdefault(ALIASES[key], value)
        elif key in FLAG_ALIASES:
            name, set_value = FLAG_ALIASES[key]
            if _truthy(value):
                out[name] = set_value
        elif key == "use_deepspeed":
            if _truthy(value):
                out.setdefault("deepspeed", cfg.get("deepspeed") or "zero2")
        else:
            out[key] = value
    return out


def normalize_argv(argv: list[str], known: set[str] | None = None) -> list[str]:
    """Rewrite alias flags on the command line (`--tuner_type lora` -> `--train_type lora`)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, val = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if known is not None and name in known:
            out.append(arg)
        elif name in ALIASES:
            out.append(f"--{ALIASES[name]}" + (f"={val}" if eq else ""))
        elif name in FLAG_ALIASES:
            canon, set_value = FLAG_ALIASES[name]
            explicit = val if eq else (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None)
            if explicit is not None and not eq:
                i += 1
            if explicit is None or _truthy(explicit):
                out += [f"--{canon}", set_value]
        elif name == "use_deepspeed":
            explicit = val if eq else (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None)
            if explicit is not None and not eq:
                i += 1
            if (explicit is None or _truthy(explicit)) and "--deepspeed" not in argv:
                out += ["--deepspeed", "zero2"]
        else:
            out.append(arg)
        i += 1
    return out


# An argument group renames a flag with a class attribute `renamed_flags = {"old": "new"}` (not a field): the old
# spelling keeps working on the command line, in config files and as a Python keyword, with a one-line notice.
def _deprecation(prog: str, old: str, new: str) -> None:
    print(f"{prog}: --{old} is deprecated; use --{new} (same meaning)", file=sys.stderr)


def rename_flags(argv: list[str], renamed: dict[str, str], prog: str) -> list[str]:
    """`--old value` / `--old=value` -> `--new ...` for this command's renamed arguments."""
    out = []
    for arg in argv:
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name in renamed:
            _deprecation(prog, name, renamed[name])
            arg = f"--{renamed[name]}" + (f"={value}" if eq else "")
        out.append(arg)
    return out


def rename_keys(cfg: dict, renamed: dict[str, str], prog: str) -> dict:
    out = {}
    for key, value in cfg.items():
        if key in renamed:
            _deprecation(prog, key, renamed[key])
            key = renamed[key]
        out[key] = value
    return out


def merge_repeated_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """`--dataset a --dataset b` -> `--dataset a b`: argparse would silently keep only the last one."""
    merged: dict[str, list[str]] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        name = flag[2:] if flag.startswith("--") else None
        i += 1
        if name not in names:
            rest.append(argv[i - 1])
            continue
        values = merged.setdefault(name, [])
        if eq:
            values.append(value)
        while not eq and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
    for name, values in merged.items():
        rest += [f"--{name}", *values]
    return rest


def load_config_file(path: str, known: set[str] | None = None) -> dict:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--config {path}: no such file; give a YAML or JSON file of arguments")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of argument names to values")
    # Nested sections ({"model": {...}, "training": {...}}) are flattened.
    flat: dict = {}
    for k, v in data.items():
        if isinstance(v, dict) and k in ("model_args", "tuner", "lora", "data", "training", "train", "args"):
            flat.update(v)
        else:
            flat[k] = v
    return apply_aliases(flat, known)


# ---------------------------------------------------------------- parsing
def _sft_only_data_fields() -> dict:
    """The data flags only supervised fine-tuning has (SFTDataArguments less DataArguments), with their defaults."""
    common = {f.name for f in fields(DataArguments)}
    return {f.name: f.default for f in fields(SFTDataArguments) if f.name not in common}


def _drop_sft_only_defaults(cfg: dict, known: set, prog: str, path: str) -> dict:
    """A command without SFT's data flags (grpo) given a config file that has them: the args.json of a run from
    before they were SFT-only lists them at their defaults, which change nothing and are dropped; any other value
    is a setting the command would ignore, so it is refused."""
    sft_only = _sft_only_data_fields()
    out = {}
    for k, v in cfg.items():
        if k in sft_only and k not in known:
            if v != sft_only[k]:
                raise UsageError(f"{prog}: {path} sets {k}: {v!r}, a data setting of vltune sft that {prog} does not "
                                 f"use; remove it from the file")
            continue
        out[k] = v
    return out


def parse_args(dataclass_types: tuple, argv: list[str] | None = None, prog: str = "vltune",
               description: str | None = None, values: dict | None = None) -> tuple:
    """Parse `--config file`, then `values` (a Python API's keywords, same names and aliases), then the command
    line into the given dataclasses (each later source wins).

    Hardware-dependent defaults (bf16/fp16, use_cpu) are set from the machine unless given.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(dataclass_types, prog=prog, description=description, allow_abbrev=False,
                     formatter_class=_HelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="A YAML or JSON file of arguments; "
                        "command-line arguments override it.")
    known = {f.name for t in dataclass_types for f in fields(t)}
    renamed = {old: new for t in dataclass_types for old, new in getattr(t, "renamed_flags", {}).items()}
    argv = rename_flags(argv, renamed, prog)
    list_flags = tuple(a.dest for a in parser._actions if a.nargs in ("+", "*"))
    argv = merge_repeated_flags(normalize_argv(argv, known), list_flags)
    pre, _ = parser.parse_known_args(argv)  # only to find --config / --device / --torch_dtype early
    cfg = rename_keys(load_config_file(pre.config, known | set(renamed)), renamed, prog) if pre.config else {}
    cfg = _drop_sft_only_defaults(cfg, known, prog, pre.config)
    unknown = sorted(set(cfg) - known - {"config"})
    if unknown:
        raise UsageError(f"{prog}: unknown key(s) in {pre.config}: {', '.join(unknown)}")
    if values:
        given = apply_aliases(rename_keys(dict(values), renamed, prog), known)
        unknown = sorted(set(given) - known)
        if unknown:
            raise UsageError(f"{prog}: unknown argument name(s): {', '.join(unknown)}")
        cfg.update(given)

    defaults = dict(cfg)
    device = detect_device(str(cfg.get("device", getattr(pre, "device", "auto"))))
    if any(issubclass(t, TrainingArguments) for t in dataclass_types):
        dtype_req = str(getattr(pre, "torch_dtype", None) or cfg.get("torch_dtype", "auto"))
        if "bf16" not in cfg and "fp16" not in cfg and "--bf16" not in argv and "--fp16" not in argv:
            dtype = resolve_dtype(dtype_req, device)
            import torch

            defaults.setdefault("bf16", device == "cuda" and dtype == torch.bfloat16)
            defaults.setdefault("fp16", device == "cuda" and dtype == torch.float16)
        if device == "cpu":
            defaults.setdefault("use_cpu", True)
    from .distributed import expand_deepspeed_preset, expand_fsdp_preset  # presets -> dicts before TrainingArguments
    argv, defaults = expand_deepspeed_preset(argv, defaults, known)
    argv, defaults = expand_fsdp_preset(argv, defaults, known)
    parser.set_defaults(**defaults)
    *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    rest = [r for r in rest if r]
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    # HfArgumentParser appends a Namespace for the non-dataclass --config flag; callers want the dataclasses.
    objs = tuple(p for p in parsed if not isinstance(p, type(pre)))
    check_values(objs)  # flag values, before any data is read or weight loaded
    return objs


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: the command's docstring as written (its example command lines stay one per line), each flag with
    its default."""


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are one line (a `UsageError`), not the whole usage text; no abbreviations
    (`--lora_ran 8` is an error, not `--lora_rank 8`), as ms-swift users expect."""

    def error(self, message: str):
        import difflib

        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        typos = [w.split("=")[0] for w in message.split() if w.startswith("--") and w not in flags] \
            if message.startswith("unrecogni") else []
        sft_fields = _sft_only_data_fields()
        sft_only = [w for w in typos if w[2:].replace("-", "_") in sft_fields]
        close = [m for w in typos if w not in sft_only for m in difflib.get_close_matches(w, flags, n=1)]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        if sft_only:  # grpo given --packing & co.: say why, not a look-alike flag
            hint += f"; {', '.join(sft_only)}: data flags of vltune sft and personalize, which {self.prog} does not use"
        raise UsageError(f"{self.prog}: {message}{hint} (all arguments: {self.prog} --help)")


def dump_config(objs: tuple, path: str | os.PathLike) -> None:
    """Write the resolved arguments of every group to one JSON file (reloadable with --config); the run's own
    state (resume_from_checkpoint, logging_dir, ...) is left out."""
    merged: dict = {}
    for obj in objs:
        if isinstance(obj, TrainingArguments):
            d = obj.to_dict()
        else:
            d = asdict(obj)
        merged.update(d)
    from .resume import RUN_SPECIFIC

    clean = {k: v for k, v in merged.items() if _jsonable(v) and k not in RUN_SPECIFIC}
    Path(path).write_text(json.dumps(clean, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v, default=str)
        return True
    except (TypeError, ValueError):
        return False
