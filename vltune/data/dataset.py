"""The SFT data set: validated up front, encoded by the collator a batch at a time.

Before training, every sample goes through `check_sample` (structure, images
readable, a trained token present, length within `max_length`), so problems
surface as one report with `file:line` locations, not as a crash at step 4000.
Invalid samples are skipped and counted, or, with `strict=True`, stop the run
before it starts. Samples are never truncated: cutting through an image span is
what produces "image features and image tokens do not match", so an over-long
sample is dropped (and counted) instead.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm

from .errors import DataError, SampleTooLong
from .formats import Sample, message_text
from .images import image_size, load_image
from ..padding import padded_on
from .template import IGNORE_INDEX, labels_from_spans, render

logger = logging.getLogger("vltune")


# ---------------------------------------------------------------- per-sample checks
class LengthEstimator:
    """Exact token length of a rendered sample without decoding its images.

    The processor is run once per distinct image size on a blank image to learn
    how many tokens the placeholder expands to; screenshots come in few sizes.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._extra_tokens: dict[tuple[int, int], int] = {}

    def image_tokens(self, size: tuple[int, int]) -> int:
        if size not in self._extra_tokens:
            token = getattr(self.processor, "image_token", "<image>")
            bare = len(self.tokenizer(token, add_special_tokens=False)["input_ids"])
            out = self.processor(text=[token], images=[Image.new("RGB", size)], add_special_tokens=False)
            self._extra_tokens[size] = len(out["input_ids"][0]) - bare
        return self._extra_tokens[size]

    def length(self, text: str, sizes: list[tuple[int, int]]) -> int:
        n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return n + sum(self.image_tokens(s) for s in sizes)


def check_sample(sample: Sample, processor, estimator: LengthEstimator, max_length: int | None,
                 loss_scale: str = "default", verify_images: bool = True) -> int:
    """Raise DataError if `sample` cannot be trained on; return its token length."""
    n_tags = sample.num_image_parts
    if n_tags != len(sample.images):
        raise DataError(f"{n_tags} <image> tag(s) but {len(sample.images)} image(s)", sample.where, "image/tag mismatch")
    roles = [m["role"] for m in sample.messages]
    if "assistant" not in roles:
        raise DataError("no assistant turn to train on", sample.where, "no trainable tokens")
    for i, m in enumerate(sample.messages):
        if m["role"] == "assistant" and not message_text(m).strip():
            raise DataError(f"assistant message {i} is empty", sample.where, "empty assistant turn")
    rendered = render(sample, processor, loss_scale)
    if not rendered.spans:
        raise DataError("every assistant turn has loss=false: nothing to train", sample.where, "no trainable tokens")
    sizes = []
    for ref in sample.images:
        try:
            sizes.append(image_size(ref, verify=verify_images))
        except DataError as e:
            kind = "missing image" if "not found" in e.message else "unreadable image"
            raise DataError(e.message, sample.where, kind) from None
    length = estimator.length(rendered.text, sizes)
    if max_length and length > max_length:
        raise SampleTooLong(f"{length} tokens > max_length {max_length} (dropped, never truncated)", sample.where)
    return length


@dataclass
class DataReport:
    """Counts of skipped samples by kind, with the first few locations of each."""

    total: int = 0
    kept: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    counts: Counter = field(default_factory=Counter)

    def add(self, err: DataError) -> None:
        self.counts[err.kind] += 1
        if len(self.problems[err.kind]) < 5:
            self.problems[err.kind].append(str(err))

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        out = []
        for kind, n in self.counts.most_common():
            out.append(f"{kind}: {n} sample(s), e.g.")
            out.extend(f"    {loc}" for loc in self.problems[kind])
        return out

    def strict_error(self, what: str = "sample") -> DataError:
        """The one-line error of `--strict true` when samples were skipped (the log lists them all)."""
        first = next(iter(self.problems.values()))[0] if self.problems else "?"
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.counts.most_common())
        return DataError(f"--strict true: {self.skipped} invalid {what}(s) in the training data ({kinds}; listed "
                         f"above), first: {first}; fix them, or drop --strict to skip and count them")

    def log(self, name: str = "train") -> None:
        logger.info("[data] %s: %d samples read, %d kept, %d skipped", name, self.total, self.kept, self.skipped)
        for line in self.lines():
            logger.warning("[data]   %s", line)


def validate_samples(samples: list[Sample], processor, max_length: int | None, loss_scale: str = "default",
                     read_errors: list[DataError] | None = None, verify_images: bool = True,
                     desc: str = "checking data") -> tuple[list[Sample], list[int], DataReport]:
    """Check every sample; return the usable ones, their lengths, and a report of the rest."""
    report = DataReport(total=len(samples) + len(read_errors or []))
    for err in read_errors or []:
        report.add(err)
    estimator = LengthEstimator(processor)
    kept, lengths = [], []
    for s in tqdm(samples, desc=desc, disable=len(samples) < 2000, leave=False):
        try:
            lengths.append(check_sample(s, processor, estimator, max_length, loss_scale, verify_images))
            kept.append(s)
        except DataError as e:
            report.add(e if e.where else e.at(s.where))
    report.kept = len(kept)
    return kept, lengths, report


# ---------------------------------------------------------------- torch data set + collator
class SFTDataset(torch.utils.data.Dataset):
    """Validated samples; `__getitem__` decodes the images. A sample whose image
    fails to decode at this point (corruption past the header) is skipped with a
    warning and replaced by the next one, so a run never dies mid-way on data."""

    def __init__(self, samples: list[Sample], lengths: list[int] | None = None):
        self.samples = samples
        self.lengths = lengths
        self.runtime_skips: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        for attempt in range(len(self.samples)):
            sample = self.samples[(idx + attempt) % len(self.samples)]
            try:
                return {"sample": sample, "images": [load_image(r) for r in sample.images]}
            except DataError as e:
                msg = str(e.at(sample.where))
                self.runtime_skips.append(msg)
                logger.warning("[data] skipping sample at load time: %s", msg)
        raise DataError("no sample of the data set could be loaded")


class SFTCollator:
    """Render a batch with the chat template, run the processor once for the batch
    (it pads text and batches pixel values the family's way), and build labels
    that cover exactly the trained assistant spans."""

    def __init__(self, processor, loss_scale: str = "default", logits_to_keep: bool = False,
                 train_separator: bool = False):
        """logits_to_keep: compute logits only from the first trained position of the batch on (the model's
        `logits_to_keep` argument, labels sliced to match). Same loss; far less lm_head + cross-entropy work,
        which dominates small VLMs with large vocabularies. Enable only for models whose forward accepts it.
        The batch is then padded on the left: every sample ends with its last answer, so the kept tail is as
        short as the longest answer instead of also spanning the length differences between samples
        (positions are relative under RoPE, so the loss is the same)."""
        self.processor = processor
        self.loss_scale = loss_scale
        self.logits_to_keep = logits_to_keep
        self.train_separator = train_separator
        self.padding_side = "left" if logits_to_keep else "right"

    def __call__(self, features: list[dict]) -> dict:
        rendered = [render(f["sample"], self.processor, self.loss_scale, train_separator=self.train_separator)
                    for f in features]
        images = [img for f in features for img in f["images"]]
        with padded_on(self.processor, self.padding_side):
            out = self.processor(
                text=[r.text for r in rendered], images=images or None, padding=True, return_tensors="pt",
                return_offsets_mapping=True, return_text_replacement_offsets=True, add_special_tokens=False,
            )
        offsets = out.pop("offset_mapping").tolist()
        replacements = out.pop("text_replacement_offsets", None) or [[] for _ in features]
        ids = out["input_ids"].tolist()
        labels = [labels_from_spans(ids[i], offsets[i], r.spans, replacements[i]) for i, r in enumerate(rendered)]
        labels = torch.tensor(labels, dtype=torch.long)
        labels[out["attention_mask"] == 0] = IGNORE_INDEX
        if self.logits_to_keep:
            trained = (labels != IGNORE_INDEX).any(0).nonzero()
            if len(trained):
                # Position p's label is predicted from the logits at p - 1: keep logits from first - 1 on.
                keep = labels.shape[1] - int(trained[0]) + 1
                labels = labels[:, -keep:]
                out["logits_to_keep"] = keep
        out["labels"] = labels
        return dict(out)
