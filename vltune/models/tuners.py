"""Tuners: LoRA / QLoRA / full fine-tuning with per-part freezing, and a summary.

Parts (vision tower, aligner, LLM) are frozen by the `freeze_*` flags. In
full mode the unfrozen parts train every weight; in LoRA mode they get
adapters (`all-linear` = every linear layer of the unfrozen parts, lm_head
excluded), and the base stays frozen.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from .config import TunerArguments
from .families import PARTS, part_of

logger = logging.getLogger("vltune")


def frozen_parts(args: TunerArguments) -> set[str]:
    parts = set()
    if args.freeze_vit:
        parts.add("vision")
    if args.freeze_aligner:
        parts.add("aligner")
    if args.freeze_llm:
        parts.add("llm")
    return parts


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def lora_target_modules(model: nn.Module, args: TunerArguments) -> list[str] | str:
    """Resolve --target_modules to full module names (or one regex string for PEFT)."""
    frozen = frozen_parts(args)
    targets = list(args.target_modules or ["all-linear"])
    linear = [n for n, m in model.named_modules() if _is_linear(m) and part_of(n) not in frozen
              and not n.endswith("lm_head")]
    if targets == ["all-linear"]:
        names = linear
    elif len(targets) == 1 and re.search(r"[\\^$*+?()\[\]|]", targets[0]):
        pattern = re.compile(targets[0])
        names = [n for n in linear if pattern.fullmatch(n)]
    else:
        wanted = set(targets)
        names = [n for n in linear if n.split(".")[-1] in wanted or n in wanted]
    if not names:
        raise ValueError(
            f"--target_modules {' '.join(targets)} matches no linear layer in the unfrozen parts "
            f"({', '.join(sorted(set(PARTS) - frozen - {'other'})) or 'none'}); check the module names with "
            f"`python -c \"...print([n for n,_ in model.named_modules()])\"` or unfreeze a part")
    return names


def apply_tuner(model: nn.Module, args: TunerArguments, gradient_checkpointing: bool = False):
    """Freeze parts and attach adapters; return the model to train (a PeftModel for lora/qlora)."""
    frozen = frozen_parts(args)
    if args.train_type not in ("lora", "qlora", "full"):
        raise ValueError(f"--train_type must be lora, qlora or full, got {args.train_type!r}")
    if args.train_type == "full":
        if args.init_adapter:
            raise ValueError("--adapters continues a LoRA adapter; it cannot be combined with --train_type full")
        for name, p in model.named_parameters():
            p.requires_grad_(part_of(name) not in frozen)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("every part is frozen (--freeze_vit/--freeze_aligner/--freeze_llm): nothing to train")
        return model

    from peft import LoraConfig, PeftModel, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if args.train_type == "qlora":
        # Keep norms/embeddings of the non-quantised parts in full precision for stable training.
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and p.ndim == 1:
                p.data = p.data.float()
    if args.init_adapter:
        model = PeftModel.from_pretrained(model, args.init_adapter, is_trainable=True)
        logger.info("[tuner] continuing LoRA adapter %s", args.init_adapter)
    else:
        config = LoraConfig(
            r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules=lora_target_modules(model, args), bias="none", task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    return model


def enable_gradient_checkpointing(model: nn.Module, kwargs: dict | None = None) -> None:
    """Non-reentrant activation checkpointing with the input-grad hook that frozen embeddings need
    (without it, reentrant checkpointing gives LoRA no gradient: seeds/03)."""
    kwargs = dict(kwargs or {"use_reentrant": False})
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.enable_input_require_grads()


# ---------------------------------------------------------------- summary
def parameter_summary(model: nn.Module) -> list[tuple[str, int, int]]:
    """[(part, trainable, total)] for vision, aligner, llm, other, and the whole model."""
    counts = {p: [0, 0] for p in PARTS}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)  # 4-bit params pack two values per byte
        part = part_of(name)
        counts[part][1] += n
        if p.requires_grad:
            counts[part][0] += n
    rows = [(part, t, n) for part, (t, n) in counts.items() if n]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    return rows


def format_summary(rows: list[tuple[str, int, int]]) -> str:
    lines = [f"{'part':<8} {'trainable':>14} {'total':>14} {'%':>7}"]
    for part, t, n in rows:
        lines.append(f"{part:<8} {t:>14,} {n:>14,} {100.0 * t / max(n, 1):>6.2f}%")
    return "\n".join(lines)
