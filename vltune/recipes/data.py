"""vltune data: work on a data set before training on it.

    vltune data check --dataset train.jsonl --model Qwen/Qwen3-VL-8B-Instruct --max_length 4096
    vltune data check --dataset a.jsonl --dataset b.jsonl --model_family qwen2_5_vl --max_pixels 1003520
    vltune data check --dataset users/ --allow_pickle true --users 11-83 --report check.json
    vltune data synth gui --out data/gui                  # 83 synthetic users: train 11-83, test 1-10 (seeds/04)
    vltune data synth gui --num_users 20 --test_users 1-4 --samples_per_user 100 --out data/gui_small

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

from ..args import ModelArguments, parse_args
from ..console import setup_logging
from ..errors import UsageError

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
        "help": "Decode every image in full to catch truncated and corrupt files, also those whose header reads "
                "(false: headers only, faster on large screenshots, but such a file is found only when training "
                "reaches it, which then skips and counts it)."})
    num_proc: int | None = field(default=None, metadata={
        "help": "Worker processes (default: the available cores, at most 8; 1 below ~1000 samples)."})
    per_device_train_batch_size: int = field(default=8, metadata={
        "help": "Batch size for the length picture: the share of a padded batch that would be padding "
                "(random batches, each padded to its longest sample). Alias --batch_size."})
    packing_length: int | None = field(default=None, metadata={
        "help": "Pack capacity for the length picture's `--packing` line (default: --max_length)."})
    max_examples: int = field(default=3, metadata={"help": "Locations shown per problem kind (up to 5)."})
    report: str | None = field(default=None, metadata={
        "help": "Also write the summary (counts, locations, messages) to this JSON file."})


def check(argv: list[str]) -> int:
    from ..data.check import check_data, default_num_proc
    from ..models.load import load_processor, resolve_model_path

    model_args, args = parse_args((ModelArguments, DataCheckArguments), argv, prog="vltune data check",
                                  description=__doc__)
    if not args.dataset:
        raise UsageError("vltune data check: give the data to check with --dataset FILE (several allowed)")
    path = resolve_model_path(model_args)
    processor = load_processor(path, model_args.max_pixels, model_args.min_pixels, model_args.trust_remote_code)
    # A data set that cannot be read at all (missing path, pickles without opt-in, ...) is a DataError, i.e. a
    # UsageError: one line and status 2. Status 1 means the data was read and has problems.
    summary = check_data(args.dataset, processor, args.max_length, args.loss_scale, args.users,
                         args.allow_pickle, args.verify_images, args.num_samples,
                         args.num_proc or default_num_proc(), args.max_examples)
    tokens = f", up to {max(summary.lengths)} tokens per sample" if summary.lengths else ""
    print(f"checked {summary.total} sample(s) from {len(summary.files)} data set(s) in {summary.seconds:.1f} s "
          f"(model {path}, --max_length {args.max_length}{tokens}): {summary.ok} ok, "
          f"{summary.total - summary.ok} with problems")
    for line in summary.lines(args.max_examples):
        print(f"  {line}")
    picture = length_picture(summary.lengths, args.per_device_train_batch_size,
                             args.packing_length or args.max_length)
    for line in picture["lines"]:
        print(line)
    if args.report:
        report = {**summary.to_dict(), "length_picture": {k: v for k, v in picture.items() if k != "lines"}}
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 1 if summary.failed else 0


def length_picture(lengths: list[int], batch_size: int, packing_length: int) -> dict:
    """Token-count histogram and what padding would waste: padded batches of `batch_size` vs `--packing`."""
    from ..data.packing import length_histogram, pack_lengths, pad_share

    if not lengths:
        return {"lines": []}
    waste = pad_share(lengths, batch_size)
    fits = [n for n in lengths if n <= packing_length]
    packs = pack_lengths(fits, packing_length)
    fill = sum(fits) / max(1, len(packs) * packing_length)
    mean = sum(lengths) / len(lengths)
    lines = [f"tokens per sample (image tokens included): min {min(lengths)}, mean {mean:.0f}, max {max(lengths)}",
             *(f"  {h}" for h in length_histogram(lengths)),
             f"padded batches of {batch_size}: {100 * waste:.1f}% of the tokens would be padding "
             f"(--padding_free true or --packing true: none)",
             f"--packing true --packing_length {packing_length}: {len(packs)} packs of {len(fits) / max(1, len(packs)):.1f} "
             f"samples, {100 * fill:.1f}% full"]
    return {"lines": lines, "pad_share": waste, "batch_size": batch_size, "packing_length": packing_length,
            "packs": len(packs), "pack_fill": fill, "mean_tokens": mean, "max_tokens": max(lengths)}


@dataclass
class SynthGUIArguments:
    renamed_flags = {"users": "num_users"}  # old spelling -> name (vltune/args.py prints a notice)

    out: str = field(default="data/gui", metadata={"help": "Output directory (JSONL, per-user pickles, images)."})
    preset: str | None = field(default=None, metadata={
        "help": "seeds_small: seeds/04's split (train users 11-83, test users 1-10) at 300 + 100 samples per user "
                "(the defaults); smoke: 6 users, 20 samples each (tests). Flags given explicitly win."})
    num_users: int = field(default=83, metadata={
        "help": "Number of users, ids 1..N; those not in --test_users train. Was --users, which elsewhere selects "
                "user ids."})
    test_users: str = field(default="1-10", metadata={"help": "Held-out users (personalisation and evaluation)."})
    samples_per_user: int = field(default=300, metadata={
        "help": "Rows per user in train.jsonl (for test users: their own adaptation data)."})
    test_per_user: int = field(default=100, metadata={
        "help": "Held-out rows per test user in test.jsonl, on screens never used for training."})
    screen: str = field(default="512x512", metadata={
        "help": "Screenshot size WxH in pixels, e.g. 1080x2400 for a phone (train the tiny model with "
                "--max_pixels 16384 so one vision token covers one grid cell)."})
    grid: str = field(default="4x4", metadata={"help": "Icon grid COLSxROWS."})
    per_screen: int = field(default=3, metadata={"help": "Instructions asked about each screenshot."})
    habit_ratio: float = field(default=0.5, metadata={
        "help": "Share of habit instructions ('open my music app'), which only the user's own data can answer."})
    model_family: str = field(default="qwen3_vl", metadata={
        "help": "Family whose click coordinates the answers use (0-1000 relative, or Qwen2.5-VL's absolute "
                "pixels of the resized image: then --model / --max_pixels decide the resize)."})
    model: str | None = field(default=None, metadata={
        "help": "Model whose processor resizes images (only matters for absolute-pixel families)."})
    max_pixels: int | None = field(default=None, metadata={"help": "As in training (absolute-pixel families)."})
    seed: int = field(default=0, metadata={"help": "Seed for users' habits, layouts and instructions."})


SYNTH_PRESETS = {
    "seeds_small": {"num_users": 83, "test_users": "1-10", "samples_per_user": 300, "test_per_user": 100},
    "smoke": {"num_users": 6, "test_users": "1-2", "samples_per_user": 20, "test_per_user": 8},
}


def _size(text: str, flag: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.lower().split("x"))
        return a, b
    except ValueError:
        raise UsageError(f"vltune data synth gui: {flag} takes WxH, e.g. 512x512 (got {text!r})") from None


def synth(argv: list[str]) -> int:
    if not argv or argv[0] != "gui":
        if argv and argv[0] in ("-h", "--help"):
            print("usage: vltune data synth gui [--help] [arguments]\n\n  gui   synthetic GUI-agent screens with "
                  "per-user habits (seeds/04 layout)")
            return 0
        what = f"unknown kind of data {argv[0]!r}" if argv else "no kind of data given"
        raise UsageError(f"vltune data synth: {what}; the one there is: `vltune data synth gui` (see `vltune data synth gui --help`)")
    import time

    from ..data.formats import parse_users
    from ..data.synthetic_gui import make_gui_set
    from ..models.families import FAMILIES

    (args,) = parse_args((SynthGUIArguments,), argv[1:], prog="vltune data synth gui", description=__doc__)
    if args.preset:
        if args.preset not in SYNTH_PRESETS:
            raise UsageError(f"vltune data synth gui: unknown --preset {args.preset!r}; choose {', '.join(SYNTH_PRESETS)}")
        given = {a.split("=")[0].lstrip("-") for a in argv[1:] if a.startswith("--")}
        given |= {"num_users"} if "users" in given else set()  # the old spelling counts as given too
        for k, v in SYNTH_PRESETS[args.preset].items():
            if k not in given:
                setattr(args, k, v)
    test = parse_users(args.test_users) or set()
    train = sorted(set(range(1, args.num_users + 1)) - test)
    if not train or not test or max(test) > args.num_users:
        raise UsageError(f"vltune data synth gui: --test_users {args.test_users} must be a non-empty subset of "
                         f"1..{args.num_users} that leaves training users")
    family = FAMILIES[args.model_family]
    processor = None
    if family.coords == "abs_resized":
        from ..args import ModelArguments
        from ..models.load import load_processor, resolve_model_path

        path = resolve_model_path(ModelArguments(model=args.model, model_family=args.model_family))
        processor = load_processor(path, args.max_pixels, None)
    t0 = time.time()
    train_spec = f"{train[0]}-{train[-1]}" if train == list(range(train[0], train[-1] + 1)) else ",".join(map(str, train))
    made = make_gui_set(args.out, train_users=train_spec, test_users=args.test_users,
                        samples_per_user=args.samples_per_user, test_per_user=args.test_per_user,
                        screen=_size(args.screen, "--screen"), grid=_size(args.grid, "--grid"),
                        per_screen=args.per_screen, habit_ratio=args.habit_ratio, seed=args.seed,
                        convention=family.coords, processor=processor)
    print(f"wrote {made['train_rows']} rows to train on ({len(train)} training users {train_spec}, plus the "
          f"adaptation rows of the {len(test)} test users {args.test_users}) and {made['test_rows']} held-out rows "
          f"of the test users, on {made['screens']} screens, to "
          f"{args.out} in {time.time() - t0:.0f} s:\n  {made['train']}\n  {made['test']}\n"
          f"  {args.out}/train/user_<id>.pkl, {args.out}/test/user_<id>.pkl (read with --allow_pickle true)\n"
          f"  {args.out}/users.json (each user's habits)")
    return 0


SUBCOMMANDS = {
    "check": (check, "validate every sample (images, tags, masks, lengths, boxes) without loading the model"),
    "synth": (synth, "write synthetic data: `vltune data synth gui` (GUI screens with per-user habits)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "help"):
        raise UsageError(f"vltune data: unknown sub-command {argv[0]!r}; choose one of: {', '.join(SUBCOMMANDS)}")
    if not argv or argv[0] not in SUBCOMMANDS:
        print("usage: vltune data <sub-command> [--help] [arguments]\n\nsub-commands:")
        for name, (_, text) in SUBCOMMANDS.items():
            print(f"  {name:<8} {text}")
        return 0
    setup_logging()
    return SUBCOMMANDS[argv[0]][0](argv[1:]) or 0
