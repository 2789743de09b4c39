"""Check a data set before any GPU time is spent (`vltune data check`).

Every sample goes through the checks `vltune sft` runs before its first step
(`validate_samples`: images present and readable, `<image>` tags vs images, empty
assistant turns, nothing left to train after masking, over `--max_length`), so a
sample this passes is a sample training keeps. One check is added here because
training itself does not need it while grounding evaluation and rewards do: every
grounding box / point must lie inside its image (ms-swift `objects.bbox`, pixels
by default or `bbox_type: norm1`, and vltune's `target.box` / `target.point`, pixels).

Only the processor is needed (to count tokens); model weights are never loaded.
Image sizes come from the file headers; with verify_images (the default) every image is also decoded in
full, so an image that is corrupt only past its header is reported here, where training finds it only
when it reaches the sample (it then skips and counts it: data_report.json's "skipped_at_load").
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from .dataset import IMAGE_REFUSED, DataReport, validate_samples
from .errors import DataError
from .formats import Sample, read_dataset
from .images import image_size

logger = logging.getLogger("vltune")

BOX_OUTSIDE = "box outside image"
BOX_MALFORMED = "malformed box"

# What to do about each problem kind (printed beside it; keys are DataError.kind values).
FIXES = {
    "missing image": "fix the path (relative paths resolve against the data file's folder)",
    "unreadable image": "re-export the image or drop the sample",
    IMAGE_REFUSED: "crop or pad the image to a shape the model's processor takes (Qwen-VL: aspect ratio under "
                   "200), or drop the sample",
    "image/tag mismatch": "put one <image> tag in the text per entry of 'images', in order",
    "empty assistant turn": "write the answer or drop the turn",
    "no trainable tokens": "give the sample an assistant answer that is trained (not \"loss\": false; with "
                           "--loss_scale last_round only the final one counts)",
    "over max_length": "raise --max_length, lower --max_pixels, or split the conversation",
    BOX_OUTSIDE: "boxes are [x1, y1, x2, y2] in pixels of the first image (bbox_type norm1: 0-1); "
                 "check for swapped x/y or coordinates of a resized copy",
    BOX_MALFORMED: "a box is [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2, a point is [x, y]",
    "invalid sample": "fix the record's JSON / fields as the message says",
}


# ---------------------------------------------------------------------------- grounding boxes
def grounding_boxes(sample: Sample) -> list[tuple[str, object, float]]:
    """[(label, coords, scale)] of every grounding annotation of `sample`.

    coords are as written ([x1, y1, x2, y2] or [x, y]); scale is the coordinate range (None = pixels, 1 = norm1).
    """
    out: list[tuple[str, object, float]] = []
    target = sample.extra.get("target")
    if isinstance(target, dict):
        for key in ("box", "point"):
            if target.get(key) is not None:
                out.append((f"target.{key}", target[key], None))
    objects = sample.extra.get("objects")
    if isinstance(objects, dict) and objects.get("bbox") is not None:
        bbox_type = objects.get("bbox_type", "real")
        scale = {"real": None, "norm1": 1.0}.get(bbox_type, "bad")
        boxes = objects["bbox"]
        if isinstance(boxes, (list, tuple)) and boxes and not isinstance(boxes[0], (list, tuple)):
            boxes = [boxes]  # one flat box instead of a list of boxes
        if scale == "bad":
            out.append((f"objects.bbox_type {bbox_type!r}", None, None))
        elif isinstance(boxes, (list, tuple)):
            out.extend((f"objects.bbox[{i}]", b, scale) for i, b in enumerate(boxes))
        else:
            out.append(("objects.bbox", boxes, None))
    return out


def check_grounding_boxes(sample: Sample, size: tuple[int, int] | None = None) -> None:
    """Raise DataError (kind "box outside image" or "malformed box") if an annotation of `sample` does not
    lie inside its first image. `size` = (width, height) of that image; read from its header if None."""
    annotations = grounding_boxes(sample)
    if not annotations:
        return
    for label, coords, scale in annotations:
        if coords is None:
            raise DataError(f"{label}: bbox_type must be 'real' (pixels) or 'norm1'", sample.where, BOX_MALFORMED)
        if (not isinstance(coords, (list, tuple)) or len(coords) not in (2, 4)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in coords)):
            raise DataError(f"{label} = {coords!r} is not [x1, y1, x2, y2] or [x, y]", sample.where, BOX_MALFORMED)
        if len(coords) == 4 and (coords[0] > coords[2] or coords[1] > coords[3]):
            raise DataError(f"{label} = {list(coords)} has x1 > x2 or y1 > y2", sample.where, BOX_MALFORMED)
    if not sample.images:
        raise DataError(f"{annotations[0][0]} given but the sample has no image", sample.where, BOX_MALFORMED)
    if size is None:
        size = image_size(sample.images[0], verify=False)  # header only: (width, height)
    width, height = size
    for label, coords, scale in annotations:
        max_x, max_y = (width, height) if scale is None else (scale, scale)
        xs, ys = coords[0::2], coords[1::2]
        if min(xs) < 0 or min(ys) < 0 or max(xs) > max_x or max(ys) > max_y:
            unit = f"a {width}x{height} px image" if scale is None else f"0-{scale:g} (bbox_type norm1)"
            raise DataError(f"{label} = {list(coords)} lies outside {unit}", sample.where, BOX_OUTSIDE)


# ---------------------------------------------------------------------------- the whole check
@dataclass
class CheckSummary:
    """Outcome of `check_data`: counts per problem kind with the first few (location, message) of each."""

    files: list[str]
    total: int = 0
    ok: int = 0
    seconds: float = 0.0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.counts)

    def add(self, kind: str, where: str, message: str, max_examples: int) -> None:
        self.counts[kind] += 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < max_examples:
            examples.append((where, message))

    def lines(self, max_locations: int = 3) -> list[str]:
        """One line per problem kind: count, first locations, the first message and the fix."""
        out = []
        for kind, n in self.counts.most_common():
            examples = self.examples.get(kind, [])
            where = ", ".join(w for w, _ in examples[:max_locations]) + (", ..." if n > max_locations else "")
            first = examples[0][1] if examples else ""
            fix = FIXES.get(kind)
            out.append(f"{kind}: {n} sample(s) at {where} -- first: {first}" + (f" -> fix: {fix}" if fix else ""))
        return out

    def to_dict(self) -> dict:
        return {"files": self.files, "total": self.total, "ok": self.ok, "problems": dict(self.counts),
                "examples": {k: [{"where": w, "message": m} for w, m in v] for k, v in self.examples.items()},
                "seconds": round(self.seconds, 2),
                "max_tokens": max(self.lengths) if self.lengths else None}


# Set in the parent before forking workers, so samples and processor are inherited, not pickled.
_JOB: dict = {}


def _check_range(bounds: tuple[int, int]) -> tuple[DataReport, list[tuple[str, str, str]], list[int], set[str]]:
    """Validate samples[start:end] like `vltune sft` does, then their grounding boxes."""
    start, end = bounds
    samples = _JOB["samples"][start:end]
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull if _JOB["quiet"] else sys.stderr):
        # in workers: no progress bars, several would overwrite each other on one terminal line
        # verify_images decodes every image in full: an image whose header reads but whose pixels do not
        # decode passes training's check before the first step and is only skipped when training reaches it.
        kept, lengths, report = validate_samples(samples, _JOB["processor"], _JOB["max_length"], _JOB["loss_scale"],
                                                 verify_images=_JOB["verify_images"], desc="checking data",
                                                 decode_images=_JOB["verify_images"])
    box_errors = []
    for s in kept:
        try:
            check_grounding_boxes(s)
        except DataError as e:
            # plain tuples: DataError does not survive pickling back from a worker (its kind is lost)
            box_errors.append((e.kind, e.where or s.where, e.message))
    kept_where = {s.where for s in kept}
    skipped_where = {s.where for s in samples} - kept_where
    return report, box_errors, lengths, skipped_where


def _split_location(text: str, candidates: set[str]) -> tuple[str, str]:
    """'path:12: message' -> ('path:12', 'message'), using the known sample locations (paths may hold ':')."""
    pos = text.find(": ")
    while pos >= 0:
        if text[:pos] in candidates:
            return text[:pos], text[pos + 2:]
        pos = text.find(": ", pos + 1)
    return "?", text


def check_data(specs: list[str], processor, max_length: int | None = 2048, loss_scale: str = "default",
               users: str | None = None, allow_pickle: bool = False, verify_images: bool = True,
               num_samples: int | None = None, num_proc: int = 1, max_examples: int = 5) -> CheckSummary:
    """Read `specs` and check every sample; return the summary (nothing is raised for bad samples).

    Args:
        specs: data files / directories, as `--dataset` takes them.
        processor: the model's processor (chat template + token counts); no model weights are needed.
        verify_images: decode each image in full (catches truncated and corrupt files, also those whose
            header reads, which training skips only when it reaches them), not only its header.
        num_proc: worker processes (fork) for large sets; 1 = in this process.
    """
    t0 = time.perf_counter()
    samples, read_errors = read_dataset(specs, users=users, allow_pickle=allow_pickle)
    if num_samples:
        samples = samples[:num_samples]
    summary = CheckSummary(files=[str(s) for s in specs], total=len(samples) + len(read_errors))
    for e in read_errors:
        summary.add(e.kind, e.where or "?", e.message, max_examples)

    n = len(samples)
    num_proc = max(1, min(num_proc, n // 1000))  # a worker pays ~0.1 s to start: not worth it below ~1k samples
    if "fork" not in multiprocessing.get_all_start_methods():
        num_proc = 1  # workers inherit samples and processor through fork (Windows has none)
    _JOB.update(samples=samples, processor=processor, max_length=max_length, loss_scale=loss_scale,
                verify_images=verify_images, quiet=num_proc > 1)
    try:
        if num_proc > 1:
            logger.info("[data] checking %d samples in %d processes", n, num_proc)
            step = -(-n // num_proc)
            with multiprocessing.get_context("fork").Pool(num_proc) as pool:
                results = pool.map(_check_range, [(i, min(i + step, n)) for i in range(0, n, step)])
        else:
            results = [_check_range((0, n))]
    finally:
        _JOB.clear()

    for report, box_errors, lengths, skipped_where in results:
        for kind, _ in report.counts.most_common():
            for text in report.problems[kind]:
                where, message = _split_location(text, skipped_where)
                summary.add(kind, where, message, max_examples)
            summary.counts[kind] += report.counts[kind] - len(report.problems[kind])  # beyond the stored examples
        for kind, where, message in box_errors:
            summary.add(kind, where, message, max_examples)
        summary.lengths.extend(lengths)
    summary.ok = summary.total - sum(summary.counts.values())
    summary.seconds = time.perf_counter() - t0
    return summary


def default_num_proc() -> int:
    """Worker processes for `vltune data check`: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))
