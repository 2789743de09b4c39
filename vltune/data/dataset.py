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

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

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
        self._extra_tokens: dict[tuple[int, int], int | DataError] = {}  # a size the processor refuses: its error

    def image_tokens(self, size: tuple[int, int]) -> int:
        if size not in self._extra_tokens:
            token = getattr(self.processor, "image_token", "<image>")
            bare = len(self.tokenizer(token, add_special_tokens=False)["input_ids"])
            try:
                out = self.processor(text=[token], images=[Image.new("RGB", size)], add_special_tokens=False)
            except ValueError as e:
                # e.g. Qwen-VL's resize refuses an aspect ratio over 200 (a long scroll capture): the sample's
                # problem, counted like the others, not a traceback that stops the whole data check or run.
                self._extra_tokens[size] = DataError(
                    f"the processor refuses a {size[0]}x{size[1]} px image: {e}", kind=IMAGE_REFUSED)
            else:
                self._extra_tokens[size] = len(out["input_ids"][0]) - bare
        found = self._extra_tokens[size]
        if isinstance(found, DataError):
            raise found
        return found

    def length(self, text: str, sizes: list[tuple[int, int]]) -> int:
        n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return n + sum(self.image_tokens(s) for s in sizes)


IMAGE_REFUSED = "image refused by processor"


def image_error(err: DataError, where: str) -> DataError:
    """An image's DataError as the sample's problem: located at `where`, of kind "missing image" or
    "unreadable image" (the same kinds before training, at load time and in `vltune data check`)."""
    kind = "missing image" if "not found" in err.message else "unreadable image"
    return DataError(err.message, where, kind)


def check_sample(sample: Sample, processor, estimator: LengthEstimator, max_length: int | None,
                 loss_scale: str = "default", verify_images: bool = True, decode_images: bool = False,
                 sizes_seen: dict | None = None) -> int:
    """Raise DataError if `sample` cannot be trained on; return its token length.

    verify_images: Pillow's integrity check of each file (cheap; see `image_size`); decode_images: decode
    each image in full too (what `vltune data check` does; training leaves it to load time, where a
    sample whose pixels do not decode is skipped and counted, instead of decoding every image twice).
    sizes_seen: file path -> size (or its DataError) of the images checked so far, so that a screen shown in
    several samples is read once."""
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
        memo = sizes_seen is not None and isinstance(ref, str)
        known = sizes_seen.get(ref) if memo else None
        try:
            if isinstance(known, DataError):
                raise known
            sizes.append(known or image_size(ref, verify=verify_images, decode=decode_images))
        except DataError as e:
            if memo:
                sizes_seen[ref] = e
            raise image_error(e, sample.where) from None
        if memo:
            sizes_seen[ref] = sizes[-1]
    length = estimator.length(rendered.text, sizes)
    if max_length and length > max_length:
        raise SampleTooLong(f"{length} tokens > max_length {max_length} (dropped, never truncated)", sample.where)
    return length


@dataclass
class DataReport:
    """Counts of skipped samples by kind, with the first few locations of each.

    `counts` covers every skipped sample: those found before training and those whose image failed to
    decode when training reached them (`add_load_skips`); `at_load` counts the latter alone."""

    total: int = 0
    kept: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    counts: Counter = field(default_factory=Counter)
    at_load: Counter = field(default_factory=Counter)
    load_skips: list[DataError] = field(default_factory=list)

    def add(self, err: DataError) -> None:
        self.counts[err.kind] += 1
        if len(self.problems[err.kind]) < 5:
            self.problems[err.kind].append(str(err))

    def add_load_skips(self, errors: list[DataError]) -> None:
        """Count the samples skipped at load time (each once, however often training met it): they were
        kept by the check before training, so they move from `kept` to the skipped."""
        for err in errors:
            self.add(err)
            self.at_load[err.kind] += 1
            self.load_skips.append(err)
        self.kept -= len(errors)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        out = []
        for kind, n in self.counts.most_common():
            late = f" ({self.at_load[kind]} of them at load time)" if self.at_load[kind] else ""
            out.append(f"{kind}: {n} sample(s){late}, e.g.")
            out.extend(f"    {loc}" for loc in self.problems[kind])
        return out

    def strict_error(self, what: str = "sample") -> DataError:
        """The one-line error of `--strict true` when samples were skipped (the log lists them all)."""
        first = next(iter(self.problems.values()))[0] if self.problems else "?"
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.counts.most_common())
        return DataError(f"--strict true: {self.skipped} invalid {what}(s) in the training data ({kinds}; listed "
                         f"above), first: {first}; fix them, or drop --strict to skip and count them")

    def log(self, name: str = "train") -> None:
        late = f" ({sum(self.at_load.values())} of them at load time)" if self.at_load else ""
        logger.info("[data] %s: %d samples read, %d kept, %d skipped%s", name, self.total, self.kept, self.skipped,
                    late)
        for line in self.lines():
            logger.warning("[data]   %s", line)

    def to_dict(self) -> dict:
        """data_report.json: total = kept + skipped; every load-time skip is listed (they passed the check
        before training, so `vltune data check --verify_images false` would not find them)."""
        return {"total": self.total, "kept": self.kept, "skipped": dict(self.counts),
                "skipped_at_load": dict(self.at_load),
                "examples": {k: v for k, v in self.problems.items()},
                "at_load": [{"where": e.where, "kind": e.kind, "message": e.message} for e in self.load_skips]}


def validate_samples(samples: list[Sample], processor, max_length: int | None, loss_scale: str = "default",
                     read_errors: list[DataError] | None = None, verify_images: bool = True,
                     desc: str = "checking data", decode_images: bool = False
                     ) -> tuple[list[Sample], list[int], DataReport]:
    """Check every sample; return the usable ones, their lengths, and a report of the rest."""
    report = DataReport(total=len(samples) + len(read_errors or []))
    for err in read_errors or []:
        report.add(err)
    estimator = LengthEstimator(processor)
    sizes_seen: dict = {}
    kept, lengths = [], []
    for s in tqdm(samples, desc=desc, disable=len(samples) < 2000, leave=False):
        try:
            lengths.append(check_sample(s, processor, estimator, max_length, loss_scale, verify_images,
                                        decode_images, sizes_seen))
            kept.append(s)
        except DataError as e:
            report.add(e if e.where else e.at(s.where))
    report.kept = len(kept)
    return kept, lengths, report


# ---------------------------------------------------------------- torch data set + collator
class SFTDataset(torch.utils.data.Dataset):
    """Validated samples; `__getitem__` decodes the images. A sample whose image
    fails to decode at this point (corruption past the header) is skipped with a
    warning and replaced by the next one, so a run never dies mid-way on data.

    Each such sample is counted once (`load_skips`), however often it is met (the
    preflight batch, every epoch). `__getitem__` runs in DataLoader worker processes
    when --dataloader_num_workers > 0, and in every rank of a multi-process run, whose
    own counts never reach the main process: with `record_skips_to`, each skip is
    also appended to a file that `load_skips` reads back."""

    SKIP_LOG = "skipped_at_load"

    def __init__(self, samples: list[Sample], lengths: list[int] | None = None, image_cache=None):
        """image_cache: an ImageCache (vltune/data/image_cache.py) that decodes each image file once."""
        self.samples = samples
        self.lengths = lengths
        self.image_cache = image_cache
        self._skipped: dict[str, DataError] = {}  # where -> error, met in this process
        self._skip_log: Path | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        for attempt in range(len(self.samples)):
            sample = self.samples[(idx + attempt) % len(self.samples)]
            try:
                load = self.image_cache.load if self.image_cache is not None else load_image
                return {"sample": sample, "images": [load(r) for r in sample.images]}
            except DataError as e:
                self._skip(image_error(e, sample.where))
        raise DataError("no sample of the data set could be loaded")

    def record_skips_to(self, folder: str | Path, rank: int = 0, fresh: bool = True) -> None:
        """Append every load-time skip to `folder`/skipped_at_load[.rankN].jsonl; `fresh` (a run that does not
        resume) empties this rank's file first, a resumed run keeps counting the samples skipped before."""
        name = f"{self.SKIP_LOG}.jsonl" if rank == 0 else f"{self.SKIP_LOG}.rank{rank}.jsonl"
        self._skip_log = Path(folder) / name
        if fresh and self._skip_log.exists():
            self._skip_log.unlink()

    def _skip(self, err: DataError) -> None:
        if err.where in self._skipped:
            return
        self._skipped[err.where] = err
        logger.warning("[data] skipping sample at load time: %s", err)
        if self._skip_log is not None:
            # One short line per write on an O_APPEND file: workers and ranks appending at once do not interleave.
            with open(self._skip_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"where": err.where, "kind": err.kind, "message": err.message}) + "\n")

    def load_skips(self) -> list[DataError]:
        """Every sample skipped at load time so far, once each, from this process and (with
        `record_skips_to`) from its DataLoader workers and the other ranks."""
        found = dict(self._skipped)
        if self._skip_log is not None:
            for path in sorted(self._skip_log.parent.glob(f"{self.SKIP_LOG}*.jsonl")):
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill mid-write
                        continue
                    found.setdefault(rec["where"], DataError(rec["message"], rec["where"], rec["kind"]))
        return list(found.values())

    @property
    def runtime_skips(self) -> list[str]:
        """The load-time skips as 'where: message' lines."""
        return [str(e) for e in self.load_skips()]


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
