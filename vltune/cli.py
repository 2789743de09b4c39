"""The `vltune` command: one entry point, subcommands -> recipes (imported lazily, so --help is fast)."""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from .errors import UsageError

COMMANDS = {
    "demo": ("vltune.recipes.demo", "train the embedded tiny Qwen3-VL on a synthetic click task and show it learns"),
    "sft": ("vltune.recipes.sft", "supervised fine-tuning of a VLM (lora | qlora | full)"),
    "grpo": ("vltune.recipes.grpo", "GRPO reinforcement learning of a VLM with reward functions (TRL GRPOTrainer)"),
    "personalize": ("vltune.recipes.personalize", "train one LoRA adapter per user on a global model loaded once"),
    "data": ("vltune.recipes.data", "check a data set before training: `vltune data check --dataset F`"),
    "infer": ("vltune.recipes.infer", "answer prompts with a model (+ adapter): one image, or a whole data set"),
    "export": ("vltune.recipes.export", "merge a LoRA adapter into the model, or a DeepSpeed ZeRO checkpoint to fp32"),
    "eval": ("vltune.recipes.evaluate", "evaluate a model: `vltune eval grounding ...`"),
    "serve": ("vltune.recipes.serve", "serve a model + per-user adapters over an OpenAI-compatible API, batched, with a playground"),
    "vla": ("vltune.recipes.vla", "train a vision-language-action policy (VLM + LSTM/MLP/GPT action head) on robot demos"),
}

USAGE = """usage: vltune <command> [--help] [arguments]

Fine-tune vision-language models on one Hugging Face Trainer engine.

commands:
{commands}

`vltune <command> --help` lists a command's arguments. Every command runs offline on the
embedded tiny model when --model is not given.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, COMMANDS))
        print(USAGE.format(commands="\n".join(f"  {k:<{width}}  {v[1]}" for k, v in COMMANDS.items())))
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vltune: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
        status = module.main(rest)
    except UsageError as e:  # the user's mistake: one line, status 2 (VLTUNE_DEBUG=1: the traceback too)
        return _usage_error(command, e, str(e))
    _teardown_distributed()
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def _usage_error(command: str, error: BaseException, message: str) -> int:
    if os.environ.get("VLTUNE_DEBUG", "") not in ("", "0"):
        traceback.print_exception(error)
    message = " ".join(message.split())
    prefix = f"vltune {command}"
    print(message if message.startswith("vltune") else f"{prefix}: {message}", file=sys.stderr)
    return 2


def _teardown_distributed() -> None:
    """End DDP runs cleanly: a barrier, then destroy the process group (avoids crashes at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
