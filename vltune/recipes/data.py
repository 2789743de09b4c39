"""vltune data: work on a data set before training on it.

    vltune data check --dataset train.jsonl --model Qwen/Qwen3-VL-8B-Instruct --max_length 4096
    vltune data check --dataset a.jsonl --dataset b.jsonl --model_family qwen2_5_vl --max_pixels 1003520
    vltune data check --dataset users/ --allow_pickle true --users 11-83 --report check.json

`check` runs, on every sample, the checks `vltune sft` runs before its first step (missing or corrupt
images, `<image>` tags vs images, empty assistant turns, nothing to train after masking, over
--max_length with the model's real image-token counts) plus grounding boxes outside their image. It loads
only the processor, never the weights, prints one line per problem kind (count, first `file:line`
locations, the fix) and exits with status 1 if any sample has a problem, 0 if all are fine.
Use the same --model / --max_pixels / --max_length / --loss_scale as the training run: token counts depend
on them.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelArguments, parse_args
from ..console import setup_logging

logger = logging.getLogger("vltune")


@dataclass
class DataCheckArguments:
    dataset: list[str] = field(default_factory=list, metadata={
        "help": "Data to check (required): ms-swift JSONL, ShareGPT/LLaVA JSON, TRL content lists, a datasets "
                "save_to_disk dir or .parquet, or a per-user pickle dir. Repeat the flag or list several."})
    users: str | None = field(default=None, metadata={
        "help": "User ids to read from a per-user data set, e.g. '11-83' or '1,3,5-7'."})
    allow_pickle: bool = field(default=False, metadata={
        "help": "Allow reading per-user .pkl files. Unpickling runs code from the file: only for data you trust."})
    max_length: int = field(default=2048, metadata={
        "help": "Tokens per sample, image tokens included, as in `vltune sft` (which drops longer samples)."})
    loss_scale: str = field(default="default", metadata={
        "help": "default | last_round, as in `vltune sft`: decides whether a sample has anything to train."})
    num_samples: int | None = field(default=None, metadata={"help": "Check only the first N samples."})
    verify_images: bool = field(default=True, metadata={
        "help": "Read every image file through to catch truncated files (false: headers only, faster on large "
                "screenshots, but a file cut short is found only when training reaches it)."})
    num_proc: int | None = field(default=None, metadata={
        "help": "Worker processes (default: the available cores, at most 8; 1 below ~1000 samples)."})
    max_examples: int = field(default=3, metadata={"help": "Locations shown per problem kind (up to 5)."})
    report: str | None = field(default=None, metadata={
        "help": "Also write the summary (counts, locations, messages) to this JSON file."})


def check(argv: list[str]) -> int:
    from ..data.check import check_data, default_num_proc
    from ..data.errors import DataError
    from ..models.load import load_processor, resolve_model_path

    model_args, args = parse_args((ModelArguments, DataCheckArguments), argv, prog="vltune data check",
                                  description=__doc__)
    if not args.dataset:
        raise SystemExit("vltune data check: give the data to check with --dataset FILE (several allowed)")
    path = resolve_model_path(model_args)
    processor = load_processor(path, model_args.max_pixels, model_args.min_pixels, model_args.trust_remote_code)
    try:
        summary = check_data(args.dataset, processor, args.max_length, args.loss_scale, args.users,
                             args.allow_pickle, args.verify_images, args.num_samples,
                             args.num_proc or default_num_proc(), args.max_examples)
    except DataError as e:  # the data set itself cannot be read (missing path, pickles without opt-in, ...)
        print(f"vltune data check: {e}", file=sys.stderr)
        return 1
    tokens = f", up to {max(summary.lengths)} tokens per sample" if summary.lengths else ""
    print(f"checked {summary.total} sample(s) from {len(summary.files)} data set(s) in {summary.seconds:.1f} s "
          f"(model {path}, --max_length {args.max_length}{tokens}): {summary.ok} ok, "
          f"{summary.total - summary.ok} with problems")
    for line in summary.lines(args.max_examples):
        print(f"  {line}")
    if args.report:
        Path(args.report).write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 1 if summary.failed else 0


SUBCOMMANDS = {
    "check": (check, "validate every sample (images, tags, masks, lengths, boxes) without loading the model"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help", "help"):
            print(f"vltune data: unknown sub-command {argv[0]!r}", file=sys.stderr)
        print("usage: vltune data <sub-command> [--help] [arguments]\n\nsub-commands:")
        for name, (_, text) in SUBCOMMANDS.items():
            print(f"  {name:<8} {text}")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help", "help") else 2)
    setup_logging()
    status = SUBCOMMANDS[argv[0]][0](argv[1:])
    if status:
        raise SystemExit(status)
