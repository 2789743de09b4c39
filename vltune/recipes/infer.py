"""vltune infer: answer prompts with a model (+ a LoRA adapter), one image or a whole data set.

    vltune infer --model Qwen/Qwen3-VL-8B-Instruct --adapters out/global_lora --image screen.png \\
        --prompt "Tap the settings icon"                       # prints the answer
    vltune infer --adapters out/global_lora --dataset test.jsonl --result_path preds.jsonl --batch_size 16
    vltune infer --image a.png --image b.png --prompt "<image>before <image>after: what changed?"
    vltune infer --adapters output/sft --image board.png --prompt "Click the red circle"   # tiny model, offline
    vltune infer --model out/global --per_user_adapters out/personal --dataset test.jsonl --result_path preds.jsonl
    vltune infer --model out/global --per_user_adapters out/personal --user 3 --image s.png --prompt "Open my music app"

Greedy decoding unless --do_sample true (then --temperature / --top_p / --top_k apply); --num_beams > 1 for
beam search. Without --model the embedded tiny model of --model_family is used, like `vltune sft`.
The processor (image resizing, chat template) is read from the adapter directory when training saved one
there, so inference sees images exactly as training did.

Batch mode writes one JSON object per line: {"where": "file:line", "prompt": last user turn,
"images": [...], "answer": ..., "reference": the sample's final assistant turn or null, "adapter": what
answered (user_N, global, or the --adapters path / base)}, written and flushed as each row is answered, with a
progress bar on stderr; a sample that cannot be run (missing image, <image> tags vs images) gets "error"
instead of "answer" and the rest go on.

With --per_user_adapters (the --output_dir of `vltune personalize`), the global model (--model, + --adapters
merged) is loaded once and each sample is answered by its user's adapter (the `user` column; --user for
--prompt), switching adapters on the loaded model; a user without an adapter (or --prompt without --user) gets the
global model, and the log says so. Records keep the data set's order (a row is written once every row
before it is answered).
"""

from __future__ import annotations

import json
import os
import logging
import sys
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ..args import ModelArguments, parse_args
from ..console import setup_logging
from ..errors import UsageError

logger = logging.getLogger("vltune")


@dataclass
class InferArguments:
    renamed_flags = {"output": "result_path"}  # old spelling -> name (vltune/args.py prints a notice)

    adapters: str | None = field(default=None, metadata={
        "help": "A LoRA adapter directory (the --output_dir of `vltune sft --train_type lora`) applied on --model."})
    per_user_adapters: str | None = field(default=None, metadata={
        "help": "The --output_dir of `vltune personalize`: answer each sample with its user's adapter on the "
                "global model (loaded once; adapters switched, not reloaded)."})
    user: int | None = field(default=None, metadata={
        "help": "With --per_user_adapters and --prompt: whose adapter answers."})
    image: list[str] = field(default_factory=list, metadata={
        "help": "Image file(s) for one prompt (repeat the flag or list several). Without <image> tags in --prompt, "
                "all images go before the text."})
    prompt: str | None = field(default=None, metadata={"help": "The user's message for a single answer."})
    system: str | None = field(default=None, metadata={"help": "Optional system message for --prompt."})
    dataset: list[str] = field(default_factory=list, metadata={
        "help": "Batch mode: answer every sample of these data sets (same formats as training). Each sample's "
                "final assistant turn, if any, is dropped from the prompt and written as the reference."})
    result_path: str | None = field(default=None, metadata={
        "help": "Batch mode: JSONL file for the predictions (default: print the lines). Was --output, which "
                "elsewhere is --output_dir."})
    users: str | None = field(default=None, metadata={"help": "User ids of a per-user data set, e.g. '11-83'."})
    allow_pickle: bool = field(default=False, metadata={
        "help": "Allow reading per-user .pkl files (unpickling runs code from the file: only for data you trust)."})
    num_samples: int | None = field(default=None, metadata={"help": "Batch mode: only the first N samples."})
    batch_size: int = field(default=8, metadata={
        "help": "Prompts generated together (left-padded). Larger = faster on a GPU, more memory."})
    max_new_tokens: int = field(default=128, metadata={"help": "Upper bound on generated tokens per answer."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float | None = field(default=None, metadata={
        "help": "Sampling temperature (with --do_sample; default: the model's generation_config)."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling mass (with --do_sample)."})
    top_k: int | None = field(default=None, metadata={
        "help": "Sample among the k most likely tokens (with --do_sample)."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width (1 = none). More beams = slower."})
    seed: int = field(default=42, metadata={"help": "Seed for sampling."})


def generation_kwargs(args: InferArguments) -> dict:
    """Keyword arguments for `generate` (greedy unless --do_sample); sampling knobs without it are an error."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "num_beams": args.num_beams}
    sampling = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k") if getattr(args, k) is not None}
    if sampling and not args.do_sample:
        raise UsageError(f"vltune infer: {', '.join('--' + k for k in sampling)} only apply with --do_sample true "
                         f"(decoding is greedy by default)")
    return {**kwargs, **sampling}


def prompt_sample(args: InferArguments):
    """The --prompt / --image / --system of the command line as a one-turn `Sample`."""
    from ..data.formats import IMAGE_TAG, normalize_row

    text = args.prompt
    n_tags = text.count(IMAGE_TAG)
    if n_tags == 0:
        text = IMAGE_TAG * len(args.image) + text
    elif n_tags != len(args.image):
        raise UsageError(f"vltune infer: --prompt has {n_tags} <image> tag(s) but {len(args.image)} --image given")
    for image in args.image:  # before the model loads, not after
        remote = str(image).startswith(("http://", "https://", "data:"))
        if not remote and not os.path.isfile(os.path.expanduser(image)):
            raise UsageError(f"vltune infer: --image {image}: no such file")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": text})
    return normalize_row({"messages": messages, "images": list(args.image)}, where="--prompt")


def prediction_record(sample, answer: str | None = None, error: str | None = None) -> dict:
    """One line of batch output: where, prompt (last user turn, <image> tags kept), images, answer, reference."""
    record = {"where": sample.where, "prompt": sample.instruction(image_tag="<image>"),
              "images": [r if isinstance(r, str) and not r.startswith("data:") else "<inline>" for r in sample.images]}
    record.update({"error": error} if error is not None else {"answer": answer})
    record["reference"] = sample.final_answer
    return record


def answer_samples(model, processor, samples: list, args: InferArguments, gen: dict):
    """Yield (sample, answer, error) in the samples' order, a batch at a time; a failing batch is retried sample
    by sample so one bad image costs one answer, not the batch."""
    from ..data.errors import DataError
    from ..generation import generate_answers

    for i in range(0, len(samples), args.batch_size):
        chunk = samples[i:i + args.batch_size]
        results = {id(s): (None, f"{s.num_image_parts} <image> tag(s) but {len(s.images)} image(s)")
                   for s in chunk if s.num_image_parts != len(s.images)}
        runnable = [s for s in chunk if id(s) not in results]
        if runnable:
            try:
                answers = generate_answers(model, processor, runnable, batch_size=len(runnable), **gen)
                results.update((id(s), (a, None)) for s, a in zip(runnable, answers))
            except DataError:
                for s in runnable:
                    try:
                        results[id(s)] = generate_answers(model, processor, [s], batch_size=1, **gen)[0], None
                    except DataError as e:
                        results[id(s)] = None, e.message
        yield from ((s, *results[id(s)]) for s in chunk)


def in_data_order(answered, adapter_name):
    """(sample, answer, error, adapter) in the samples' order, from `iter_answers_per_user`'s (index, user,
    (sample, answer, error)): each row is released as soon as every row before it is answered, so a data set
    split by user (its users' rows contiguous) streams, and an interleaved one is still written in order."""
    pending, next_i = {}, 0
    for i, user, (sample, answer, error) in answered:
        pending[i] = (sample, answer, error, adapter_name(user))
        while next_i in pending:
            yield pending.pop(next_i)
            next_i += 1


def run_infer(model_args: ModelArguments, args: InferArguments) -> list[dict]:
    """Run single or batch inference; return the records (single mode: one, with the answer)."""
    from transformers import set_seed

    from ..data.formats import read_dataset
    from ..models.inference import load_for_inference

    if bool(args.prompt) == bool(args.dataset):
        raise UsageError("vltune infer: give either --prompt (with --image) for one answer, or --dataset for a batch")
    if args.image and not args.prompt:
        raise UsageError("vltune infer: --image needs --prompt")
    gen = generation_kwargs(args)
    set_seed(args.seed)
    if args.prompt:
        samples, errors = [prompt_sample(args)], []
    else:
        samples, errors = read_dataset(args.dataset, users=args.users, allow_pickle=args.allow_pickle)
        samples = samples[: args.num_samples] if args.num_samples else samples
        for e in errors:
            logger.warning("[data] skipped unreadable record: %s", e)
    if args.user is not None and not args.per_user_adapters:
        raise UsageError("vltune infer: --user picks an adapter of --per_user_adapters; give that too")
    if args.per_user_adapters:
        from ..generation import iter_answers_per_user
        from ..models.adapters import UserAdapters, load_global

        model, processor, _ = load_global(model_args, args.adapters or model_args.model)
        bank = UserAdapters(model, args.per_user_adapters)
        if args.prompt:
            samples[0].extra["user"] = args.user

        def model_for_user(user):
            user = None if user is None else int(user)
            if user not in bank.paths:
                logger.warning("[infer] %s: answered by the global model (%s)", "--prompt" if args.prompt else
                               f"user {user}'s rows" if user is not None else "rows without a user",
                               "no --user given" if user is None else
                               f"no adapter for user {user} in {args.per_user_adapters}; it has users {bank.users}")
            return bank.use(user)

        answered = in_data_order(iter_answers_per_user(
            samples, model_for_user, lambda model, part, user: answer_samples(model, processor, part, args, gen)),
            lambda user: f"user_{user}" if user is not None and int(user) in bank.paths else "global")
    else:
        model, processor, _ = load_for_inference(model_args, args.adapters)
        answered = ((s, a, e, args.adapters or "base") for s, a, e in answer_samples(model, processor, samples,
                                                                                        args, gen))

    records = []
    out = open(args.result_path, "w", encoding="utf-8") if args.result_path else None
    bar = tqdm(total=len(samples), desc="[infer] answering", unit="row", disable=bool(args.prompt), file=sys.stderr)
    try:
        for sample, answer, error, adapter in answered:
            record = prediction_record(sample, answer, error)
            record["adapter"] = adapter
            records.append(record)
            bar.update()
            if error is not None and not args.prompt:  # one bad row of a batch: say so and go on
                logger.warning("[infer] %s: %s", sample.where, error)
            if args.prompt:
                if error is not None:
                    raise UsageError(f"vltune infer: {error}")
                print(answer)
            else:
                print(json.dumps(record, ensure_ascii=False), file=out or sys.stdout, flush=True)
    finally:
        bar.close()
        if out is not None:
            out.close()
    if args.dataset:
        failed = sum("error" in r for r in records)
        logger.info("[infer] %d answer(s)%s%s", len(records) - failed, f", {failed} failed" if failed else "",
                    f" -> {args.result_path}" if args.result_path else "")
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    model_args, args = parse_args((ModelArguments, InferArguments), argv, prog="vltune infer", description=__doc__)
    setup_logging()
    return run_infer(model_args, args)
