"""GRPO prompts: each conversation without its final assistant turn (checked, never truncated), every other
column kept for the rewards, as a datasets.Dataset TRL samples from."""

from __future__ import annotations

from ..arg_checks import check_users_have_data

import logging
from dataclasses import dataclass
from pathlib import Path

from ..args import DataArguments
from ..data.dataset import DataReport, LengthEstimator
from ..data.errors import DataError
from ..data.formats import Sample, read_dataset
from ..data.images import image_size, load_image
from ..data.splits import split_holdout
from ..data.template import prompt_text
from .grpo_config import RewardArguments

logger = logging.getLogger("vltune")


@dataclass
class PromptRow:
    sample: Sample  # the conversation without its final assistant turn (for generation outside TRL)
    prompt: list[dict]  # TRL conversational prompt: [{"role", "content": [{"type": "image"} | {"type": "text"}]}]
    columns: dict  # every other column of the data set (+ `solution` from the dropped final turn)


def prompt_rows(samples: list[Sample], processor, max_length: int | None, read_errors=None,
                solution_column: str = "solution") -> tuple[list[PromptRow], DataReport]:
    """Drop each conversation's final assistant turn, check the rest, keep the other columns."""
    report = DataReport(total=len(samples) + len(read_errors or []))
    for err in read_errors or []:
        report.add(err)
    estimator = LengthEstimator(processor)
    rows = []
    for s in samples:
        try:
            answer = s.final_answer
            prompt_only = s.prompt_only()
            messages = prompt_only.messages
            if not any(m["role"] == "user" for m in messages):
                raise DataError("no user turn to prompt with", s.where, "no prompt")
            if prompt_only.num_image_parts != len(s.images):
                raise DataError(f"{prompt_only.num_image_parts} <image> tag(s) in the prompt but {len(s.images)} "
                                f"image(s)", s.where, "image/tag mismatch")
            sizes = [image_size(ref) for ref in s.images]
            if max_length:
                n = estimator.length(prompt_text(prompt_only, processor), sizes)
                if n > max_length:
                    raise DataError(f"prompt of {n} tokens > max_length {max_length} (dropped, never truncated)",
                                    s.where, "too long")
        except DataError as e:
            report.add(e if e.where else e.at(s.where))
            continue
        columns = dict(s.extra)
        if answer is not None and solution_column not in columns:
            columns[solution_column] = answer
        prompt = [{"role": m["role"], "content": [dict(p) for p in m["content"]]} for m in messages]
        rows.append(PromptRow(prompt_only, prompt, columns))
    report.kept = len(rows)
    return rows, report


def rows_to_dataset(rows: list[PromptRow]):
    """A datasets.Dataset that TRL can sample from; images are decoded (PIL) only when a batch is drawn."""
    import datasets

    columns = sorted({k for r in rows for k in r.columns} - {"prompt", "images", "image"})
    has_images = any(r.sample.images for r in rows)

    def decode(batch: dict) -> dict:
        chosen = [rows[i] for i in batch["__row"]]
        # sample_id: where each prompt came from, so that a non-finite step can name its prompts.
        out = {"prompt": [r.prompt for r in chosen], "sample_id": [r.sample.where for r in chosen]}
        if has_images:
            out["images"] = [[load_image(ref) for ref in r.sample.images] for r in chosen]
        for c in columns:
            out[c] = [r.columns.get(c) for r in chosen]
        return out

    return datasets.Dataset.from_dict({"__row": list(range(len(rows)))}).with_transform(decode)


def build_prompts(data: DataArguments, reward: RewardArguments, processor, seed: int, output_dir: str, convention: str):
    """Read the data, make prompt rows; return (train rows, held-out rows or [], report)."""
    specs = list(data.dataset)
    val_specs = list(data.val_dataset)
    if not specs:
        from ..data.synthetic import make_grounding_set

        check_users_have_data(data.users)

        made = make_grounding_set(Path(output_dir) / "demo_data", n_train=256, n_test=32, seed=seed,
                                  convention=convention, processor=processor)
        specs = [made["train"]]
        val_specs = val_specs or [made["test"]]
        logger.info("[data] no --dataset given: using the demo's synthetic grounding set (%s)", made["train"])
    samples, errors = read_dataset(specs, users=data.users, allow_pickle=data.allow_pickle)
    if data.num_samples:
        samples = samples[: data.num_samples]
    rows, report = prompt_rows(samples, processor, data.max_length, errors, reward.solution_column)
    report.log("train prompts")
    if report.skipped and data.strict:
        raise report.strict_error("prompt")
    if not rows:
        raise DataError("no usable training prompt; see the report above")
    heldout: list[PromptRow] = []
    if val_specs:
        vs, verr = read_dataset(val_specs, users=None, allow_pickle=data.allow_pickle)
        heldout, vrep = prompt_rows(vs, processor, data.max_length, verr, reward.solution_column)
        vrep.log("held-out prompts")
    elif data.split_dataset_ratio > 0:
        rows, heldout = split_holdout(rows, data.split_dataset_ratio, seed)
    logger.info("[data] %d training prompts, %d held-out prompts", len(rows), len(heldout))
    return rows, heldout, report
