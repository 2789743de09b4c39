"""A dirty data set for drills: the synthetic GUI set with broken samples of every kind `vltune data check`
knows, written where a real data set would have them, and a manifest of what was broken where.

`make_dirty_gui_set(out_dir, n_samples, rate)` writes `train.jsonl` (ms-swift JSONL) + `images/` as
`make_gui_set` does, then breaks `round(rate * n_samples)` rows, the broken variants (`FAULTS`) dealt out in
turn over randomly chosen rows, so every variant gets its share. Each variant names the problem kind
vltune reports for it and the stage at which `vltune sft` finds it:

- "read": the line cannot be turned into a sample (bad JSON, unknown role, ...);
- "check": the check before the first step (tags vs images, empty answer, missing or unreadable image, ...);
- "load": only when training decodes the image (the header reads, Pillow's `verify` passes, the pixels do
  not decode): skipped then, and counted in data_report.json's `skipped_at_load`;
- "data check": grounding boxes, which `vltune data check` checks and training does not need.

An image fault gets its own file (a copy of the row's screenshot, broken), so rows sharing a screenshot
stay whole. `faults.json` lists every broken line; `expected_counts` turns it into the counts per kind
that `data check` and `sft` must report. Deterministic for a given seed. The "image refused by processor"
variant (an aspect ratio of 250) holds for the Qwen-VL processors (the embedded tiny models included).
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from .dataset import IMAGE_REFUSED
from .errors import DataError
from .images import image_size, load_image
from .synthetic_gui import make_gui_set

INVALID, MISMATCH, NOTHING, EMPTY = "invalid sample", "image/tag mismatch", "no trainable tokens", "empty assistant turn"
MISSING, UNREADABLE, TOO_LONG = "missing image", "unreadable image", "over max_length"
OUTSIDE, MALFORMED = "box outside image", "malformed box"  # vltune.data.check's kinds


@dataclass
class Row:
    """The row being broken, and where its files go."""

    data: dict
    line: int  # 1-based line in train.jsonl
    root: Path  # the data set's folder (image paths are relative to it)
    max_length: int

    @property
    def image(self) -> Path:
        return self.root / self.data["images"][0]

    def new_image(self, data: bytes, suffix: str = ".png") -> None:
        """Write `data` as this row's own image file and point the row at it."""
        name = f"images/fault_{self.line:06d}{suffix}"
        (self.root / name).write_bytes(data)
        self.data["images"] = [name]

    def answer(self) -> dict:
        return self.data["messages"][-1]

    def prompt(self) -> dict:
        return self.data["messages"][0]


@dataclass(frozen=True)
class Fault:
    name: str
    kind: str  # what vltune reports (DataError.kind)
    stage: str  # read | check | load | data check (see the module docstring)
    apply: Callable[[Row], str | None]  # breaks row.data in place, or returns the raw line to write instead


# ---------------------------------------------------------------------------- PNG surgery
def _chunks(png: bytes) -> list[tuple[bytes, int, int]]:
    """[(type, offset of the chunk's length field, payload length)] of a PNG file."""
    pos, out = 8, []
    while pos + 8 <= len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        out.append((png[pos + 4:pos + 8], pos, length))
        pos += 12 + length
    return out


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _idat(png: bytes) -> tuple[int, int]:
    _, pos, length = next(c for c in _chunks(png) if c[0] == b"IDAT")
    return pos, length


def png_pixels_corrupt(png: bytes) -> bytes:
    """The compressed pixel data garbled, every checksum recomputed: the header reads and `verify` passes
    (it checks chunk CRCs, it inflates nothing); decoding fails."""
    pos, length = _idat(png)
    payload = bytearray(png[pos + 8:pos + 8 + length])
    for i in range(2, len(payload), 3):  # past the 2-byte zlib header, so it still starts like a stream
        payload[i] ^= 0x5A
    return png[:pos] + _chunk(b"IDAT", bytes(payload)) + png[pos + 12 + length:]


def png_bad_checksum(png: bytes) -> bytes:
    """The pixel data intact, its chunk CRC wrong: `verify` (training's check before the first step) finds it."""
    pos, length = _idat(png)
    crc = pos + 8 + length
    return png[:crc] + bytes(b ^ 0xFF for b in png[crc:crc + 4]) + png[crc + 4:]


def png_bomb_header(png: bytes, side: int = 30000) -> bytes:
    """A header declaring side x side pixels: past twice Pillow's decompression-bomb limit, refused at open."""
    ihdr = png[16:29]  # width, height, then bit depth, colour type, ...
    return png[:8] + _chunk(b"IHDR", struct.pack(">II", side, side) + ihdr[8:]) + png[33:]


def _image_bytes(row: Row) -> bytes:
    return row.image.read_bytes()


# ---------------------------------------------------------------------------- the variants
def _bad_json(r: Row) -> str:
    text = json.dumps(r.data)
    return text[: len(text) // 2]  # a line cut short (an editor crash, a partial copy)


def _unknown_role(r: Row) -> None:
    r.prompt()["role"] = "narrator"


def _no_messages(r: Row) -> None:
    r.data["msgs"] = r.data.pop("messages")


def _messages_not_objects(r: Row) -> None:
    r.data["messages"] = [m["content"] for m in r.data["messages"]]


def _bad_loss_scale(r: Row) -> None:
    r.answer()["loss_scale"] = "high"


def _extra_tag(r: Row) -> None:
    r.prompt()["content"] = "<image>" + r.prompt()["content"]


def _missing_tag(r: Row) -> None:
    r.prompt()["content"] = r.prompt()["content"].replace("<image>", "")


def _no_assistant(r: Row) -> None:
    r.data["messages"] = r.data["messages"][:1]


def _not_trained(r: Row) -> None:
    r.answer()["loss"] = False


def _empty_answer(r: Row) -> None:
    r.answer()["content"] = ""


def _blank_answer(r: Row) -> None:
    r.answer()["content"] = " \n\t "


def _missing_file(r: Row) -> None:
    r.data["images"] = [f"images/missing_{r.line:06d}.png"]


def _not_an_image(r: Row) -> None:
    r.new_image(b"<html>404 Not Found</html>\n")


def _empty_file(r: Row) -> None:
    r.new_image(b"")


def _cut_after_ihdr(r: Row) -> None:
    r.new_image(_image_bytes(r)[:33])  # signature + IHDR, nothing more


def _cut_in_half(r: Row) -> None:
    png = _image_bytes(r)
    r.new_image(png[: len(png) // 2])


def _bad_checksum(r: Row) -> None:
    r.new_image(png_bad_checksum(_image_bytes(r)))


def _bomb(r: Row) -> None:
    r.new_image(png_bomb_header(_image_bytes(r)))


def _refused_shape(r: Row) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4000, 16), (240, 240, 240)).save(buf, "PNG")  # aspect ratio 250: a scroll capture
    r.new_image(buf.getvalue())


def _long_answer(r: Row) -> None:
    r.answer()["content"] = " ".join(["click(500, 500)"] * (2 * r.max_length))


def _pixels_corrupt(r: Row) -> None:
    r.new_image(png_pixels_corrupt(_image_bytes(r)))


def _jpeg_cut_short(r: Row) -> None:
    buf = io.BytesIO()
    Image.open(r.image).convert("RGB").save(buf, "JPEG", quality=90)
    jpg = buf.getvalue()
    r.new_image(jpg[: len(jpg) * 3 // 5], ".jpg")  # headers and part of the scan: decodes only partly


def _boxes(r: Row, box: list) -> None:
    r.data["objects"]["bbox"] = [box]
    r.data["target"]["box"] = list(box)


def _box_outside(r: Row) -> None:
    x1, y1, x2, y2 = r.data["target"]["box"]
    width = r.data["target"]["size"][0]
    _boxes(r, [x1, y1, width + 40, y2])  # past the right edge (coordinates of a larger copy)


def _box_swapped(r: Row) -> None:
    x1, y1, x2, y2 = r.data["target"]["box"]
    _boxes(r, [x2, y1, x1, y2])


def _box_three_numbers(r: Row) -> None:
    _boxes(r, r.data["target"]["box"][:3])


FAULTS: tuple[Fault, ...] = (
    Fault("bad JSON line", INVALID, "read", _bad_json),
    Fault("unknown role", INVALID, "read", _unknown_role),
    Fault("no messages field", INVALID, "read", _no_messages),
    Fault("messages are strings", INVALID, "read", _messages_not_objects),
    Fault("loss_scale not a number", INVALID, "read", _bad_loss_scale),
    Fault("extra <image> tag", MISMATCH, "check", _extra_tag),
    Fault("no <image> tag", MISMATCH, "check", _missing_tag),
    Fault("no assistant turn", NOTHING, "check", _no_assistant),
    Fault("answer with loss false", NOTHING, "check", _not_trained),
    Fault("empty answer", EMPTY, "check", _empty_answer),
    Fault("blank answer", EMPTY, "check", _blank_answer),
    Fault("image file missing", MISSING, "check", _missing_file),
    Fault("not an image", UNREADABLE, "check", _not_an_image),
    Fault("empty image file", UNREADABLE, "check", _empty_file),
    Fault("PNG cut after IHDR", UNREADABLE, "check", _cut_after_ihdr),
    Fault("PNG cut in half", UNREADABLE, "check", _cut_in_half),
    Fault("PNG bad checksum", UNREADABLE, "check", _bad_checksum),
    Fault("PNG bomb header", UNREADABLE, "check", _bomb),
    Fault("aspect ratio 250", IMAGE_REFUSED, "check", _refused_shape),
    Fault("answer too long", TOO_LONG, "check", _long_answer),
    Fault("PNG pixels corrupt (header and CRCs fine)", UNREADABLE, "load", _pixels_corrupt),
    Fault("JPEG cut short (header fine)", UNREADABLE, "load", _jpeg_cut_short),
    Fault("box outside image", OUTSIDE, "data check", _box_outside),
    Fault("box x1 > x2", MALFORMED, "data check", _box_swapped),
    Fault("box of 3 numbers", MALFORMED, "data check", _box_three_numbers),
)


def _self_check(fault: Fault, row: Row) -> None:
    """A load-stage image must pass training's check before the first step and fail to decode (so the drill
    tests what it claims on this Pillow); the other image faults must fail that check."""
    if fault.stage not in ("load", "check") or not row.data.get("images"):
        return
    ref = str(row.root / row.data["images"][0])
    try:
        image_size(ref, verify=True)
        header_ok = True
    except DataError:
        header_ok = False
    if fault.stage == "load":
        try:
            load_image(ref)
        except DataError:
            decodes = False
        else:
            decodes = True
        if not header_ok or decodes:
            raise RuntimeError(f"fault {fault.name!r} at line {row.line}: header reads {header_ok}, decodes "
                               f"{decodes}; it must read and not decode")
    elif fault.kind == UNREADABLE and header_ok:
        raise RuntimeError(f"fault {fault.name!r} at line {row.line}: passes the header check, expected to fail it")


# ---------------------------------------------------------------------------- the data set
def make_dirty_gui_set(out_dir: str | Path, n_samples: int = 20000, rate: float = 0.02, seed: int = 0,
                       max_length: int = 256, screen: tuple[int, int] = (128, 128),
                       faults: tuple[Fault, ...] = FAULTS) -> dict:
    """Write the GUI set with `round(rate * n_samples)` broken rows under `out_dir`; return the manifest
    (also written to out_dir/faults.json). `max_length` is the run's --max_length (the over-long rows
    exceed it twice over). Needs at least one broken row per variant."""
    out = Path(out_dir)
    n_faulty = round(rate * n_samples)
    if n_faulty < len(faults):
        raise ValueError(f"{n_faulty} broken rows cannot cover the {len(faults)} fault variants: raise rate or "
                         f"n_samples (rate >= {len(faults) / n_samples:.3g})")
    users = -(-n_samples // 200)
    made = make_gui_set(out, train_users=f"1-{users}", test_users="", samples_per_user=-(-n_samples // users),
                        test_per_user=0, screen=screen, grid=(4, 4), seed=seed, pickles=False)
    path = Path(made["train"])
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n_samples]]
    rng = random.Random(f"faults-{seed}")
    chosen = rng.sample(range(n_samples), n_faulty)
    lines = [json.dumps(r) for r in rows]
    broken = []
    for k, index in enumerate(chosen):
        fault = faults[k % len(faults)]
        row = Row(rows[index], index + 1, out, max_length)
        raw = fault.apply(row)
        _self_check(fault, row)
        lines[index] = raw if raw is not None else json.dumps(row.data)
        broken.append({"line": index + 1, "name": fault.name, "kind": fault.kind, "stage": fault.stage})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    broken.sort(key=lambda b: b["line"])
    manifest = {"train": str(path), "samples": n_samples, "broken": n_faulty, "rate": rate, "seed": seed,
                "max_length": max_length, "screen": list(screen), "faults": broken}
    (out / "faults.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def expected_counts(manifest: dict) -> dict[str, dict[str, int]]:
    """What each tool must report for the manifest's data set, per problem kind:
    data_check (every broken row), sft_skipped (all but the box faults, which training does not check),
    sft_at_load (the rows whose image decodes only at load time)."""
    faults = manifest["faults"]
    return {
        "data_check": dict(Counter(f["kind"] for f in faults)),
        "sft_skipped": dict(Counter(f["kind"] for f in faults if f["stage"] != "data check")),
        "sft_at_load": dict(Counter(f["kind"] for f in faults if f["stage"] == "load")),
    }
