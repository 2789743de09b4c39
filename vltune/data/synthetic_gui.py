"""Synthetic GUI-agent data with per-user habits: home screens of app icons -> `click(x, y)`.

Each screenshot is a phone/tablet home screen: a status bar, then a grid of app icons (a coloured glyph
with the app's name under it) on a lightly varied background, icon sizes varying per screen. Every app
has a fixed look, like real apps, so "Open Atlas" is answerable from the screen once the model has
learned what Atlas looks like. The looks are what the embedded tiny model can read (its vision tower was
pretrained on six colours, one token per grid cell): one colour per app. A real VLM reads the label.

Users differ in what a screen cannot tell: each user has a preferred app per category ("my music app",
"the app I navigate with") drawn from a skewed population prior, and a favourite verb ("Open", "Launch", ...).
A habit instruction always shows both apps of its category, the user's and the rival, so a global
model can only guess the population's favourite, while a per-user adapter can learn the user's own.
That makes personalisation measurable: personalised > global on habit instructions, equal on explicit ones.

Layout written by `make_gui_set` (the seeds/04 split as a preset: train users 11-83, test users 1-10):

    DIR/images/screen_<n>.png
    DIR/train.jsonl      ms-swift JSONL, a "user" column; test users' rows here are their own adaptation data
    DIR/test.jsonl       held-out rows of the test users (different screens, same habits)
    DIR/train/user_<id>.pkl, DIR/test/user_<id>.pkl   the same rows, seeds/04's per-user pickle layout
    DIR/users.json       each user's habits (the ground truth personalisation should recover)
    DIR/meta.json        generator settings

Rows carry the grounding target ({"box", "point", "size"} in pixels), the instruction kind
("explicit" | "habit") and the category, for per-kind evaluation.
"""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..boards import COLORS, draw_shape

# Three categories x two apps; a user prefers one app per category. Each app has its own colour (the
# six colours the tiny model's vision tower was pretrained to read) and its category's glyph.
CATEGORIES = {
    "music": ("Melody", "Beats"),
    "chat": ("Messages", "Signal"),
    "maps": ("Maps", "Atlas"),
}
GLYPHS = ("circle", "square", "triangle")
# Population prior over each category's apps: a global model can learn the favourite (~60% of users).
PRIOR = (0.6, 0.4)
HABIT_PHRASES = {
    "music": ("my music app", "my usual music player", "the app I play music with"),
    "chat": ("my chat app", "the app I message friends with", "my usual messenger"),
    "maps": ("my maps app", "the app I navigate with", "my usual maps"),
}
VERBS = ("Open", "Tap", "Launch", "Go to", "Start")
SEEDS_SPLIT = {"train_users": "11-83", "test_users": "1-10"}


def app_looks() -> dict[str, tuple[str, str]]:
    """App name -> (colour, glyph): one colour per app, one glyph per category, fixed so every screen agrees."""
    colors = iter(COLORS)
    return {app: (next(colors), GLYPHS[ci]) for ci, apps in enumerate(CATEGORIES.values()) for app in apps}


APP_LOOKS = app_looks()
APP_CATEGORY = {app: cat for cat, apps in CATEGORIES.items() for app in apps}


@dataclass
class UserProfile:
    user: int
    preferred: dict[str, str]  # category -> app
    verb: str

    def to_dict(self) -> dict:
        return {"user": self.user, "preferred": self.preferred, "verb": self.verb}


def make_profile(user: int, seed: int) -> UserProfile:
    rng = random.Random(f"profile-{seed}-{user}")
    preferred = {cat: rng.choices(apps, weights=PRIOR)[0] for cat, apps in CATEGORIES.items()}
    return UserProfile(user, preferred, rng.choice(VERBS))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        return ImageFont.load_default()


def render_screen(rng: random.Random, apps: list[str], width: int, height: int, cols: int, rows: int):
    """A home screen with `apps` placed in random grid cells; returns (image, {app: box})."""
    bg = tuple(min(255, c + rng.randint(-8, 8)) for c in (244, 244, 246))
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    cw, ch = width / cols, height / rows
    bar = max(4, round(height / 40))
    draw.rectangle((0, 0, width - 1, bar - 1), fill=(60, 60, 70))
    draw.text((bar, 0), f"{rng.randint(7, 22)}:{rng.randint(0, 59):02d}", fill=(235, 235, 235),
              font=_font(max(6, bar - 2)))
    label_px = max(6, round(ch / 12))
    font = _font(label_px)
    scale = rng.uniform(0.55, 0.72)  # icon size varies per screen
    boxes = {}
    for app, cell in zip(apps, rng.sample(range(cols * rows), len(apps))):
        row, col = divmod(cell, cols)
        cx, cy = (col + 0.5) * cw, (row + 0.5) * ch - label_px / 2
        half = min(cw, ch) * scale / 2
        box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
        color, glyph = APP_LOOKS[app]
        draw_shape(draw, glyph, box, COLORS[color])
        tw = draw.textlength(app, font=font)
        draw.text((cx - tw / 2, box[3] + 2), app, fill=(70, 70, 70), font=font)
        # the tappable area: icon + label, inside the screen (on small screens the minimum label size
        # pushed a bottom-row label past the edge, a box `vltune data check` rightly calls outside the image)
        boxes[app] = [max(0, box[0]), max(0, box[1]), min(width, box[2]), min(height, box[3] + 2 + label_px)]
    return img, boxes


def _instruction(rng: random.Random, profile: UserProfile, kind: str, target: str) -> str:
    verb = profile.verb if rng.random() < 0.8 else rng.choice(VERBS)
    if kind == "habit":
        return f"{verb} {rng.choice(HABIT_PHRASES[APP_CATEGORY[target]])}"
    return rng.choice((f"{verb} {target}", f"{verb} the {target} app", f"{verb} the {target} icon"))


def _screen_samples(rng: random.Random, profile: UserProfile, n: int, habit_ratio: float, width: int, height: int,
                    cols: int, rows: int, icons: tuple[int, int]):
    """One screen and up to `n` instructions on it: [(instruction, target app, kind)], image, boxes."""
    n_icons = rng.randint(*icons)
    # Sparse screens (1 icon) only get explicit instructions; they teach reading positions first, the way
    # the demo's 1-shape boards do. Denser screens show one or more habit categories with both their apps
    # (the user's and the rival), so the screen alone cannot tell which one "my music app" is.
    habit_cats = rng.sample(list(CATEGORIES), k=min(len(CATEGORIES), n_icons // 2)) if n_icons >= 2 else []
    apps = [a for cat in habit_cats for a in CATEGORIES[cat]]
    others = [a for a in APP_LOOKS if a not in apps]
    apps += rng.sample(others, k=max(0, n_icons - len(apps)))
    rng.shuffle(apps)
    img, boxes = render_screen(rng, apps, width, height, cols, rows)
    asks = []
    for _ in range(n):
        if habit_cats and rng.random() < habit_ratio:
            cat = rng.choice(habit_cats)
            target, kind = profile.preferred[cat], "habit"
        else:
            target, kind = rng.choice(apps), "explicit"
        asks.append((_instruction(rng, profile, kind, target), target, kind))
    return img, boxes, asks


def make_gui_set(out_dir: str | Path, train_users: str = SEEDS_SPLIT["train_users"],
                 test_users: str = SEEDS_SPLIT["test_users"], samples_per_user: int = 300, test_per_user: int = 100,
                 screen: tuple[int, int] = (512, 512), grid: tuple[int, int] = (4, 4), per_screen: int = 3,
                 habit_ratio: float = 0.5, icons: tuple[int, int] = (1, 6), seed: int = 0,
                 convention: str = "rel1000", processor=None, pickles: bool = True) -> dict:
    """Write the GUI set under `out_dir` (layout in the module docstring); return paths and counts.

    `samples_per_user` rows per user go to train.jsonl (for test users: their adaptation data), and
    `test_per_user` held-out rows per *test* user go to test.jsonl, on screens never used in training.
    `convention`/`processor` give the answer coordinates of the model family (see vltune/coords.py).
    """
    from ..coords import format_click, to_model_coords
    from .formats import parse_users

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    width, height = screen
    cols, rows = grid
    if icons[1] > cols * rows or icons[1] > len(APP_LOOKS):
        raise ValueError(f"up to {icons[1]} icons do not fit a {cols}x{rows} grid or the {len(APP_LOOKS)} apps")
    train_ids, test_ids = sorted(parse_users(train_users) or ()), sorted(parse_users(test_users) or ())
    if set(train_ids) & set(test_ids):
        raise ValueError(f"train users and test users overlap: {sorted(set(train_ids) & set(test_ids))}")
    profiles = {u: make_profile(u, seed) for u in train_ids + test_ids}
    screen_no = 0
    rows_by_split: dict[str, dict[int, list[dict]]] = {"train": {}, "test": {}}

    def emit(split: str, user: int, n: int) -> None:
        nonlocal screen_no
        rng = random.Random(f"{seed}-{split}-{user}")
        profile = profiles[user]
        made: list[dict] = []
        while len(made) < n:
            img, boxes, asks = _screen_samples(rng, profile, min(per_screen, n - len(made)), habit_ratio, width,
                                               height, cols, rows, icons)
            name = f"images/screen_{screen_no:06d}.png"
            screen_no += 1
            img.save(out / name, optimize=False, compress_level=1)
            for instruction, target, kind in asks:
                x1, y1, x2, y2 = boxes[target]
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                mx, my = to_model_coords(cx, cy, width, height, convention, processor)
                made.append({
                    "messages": [{"role": "user", "content": f"<image>{instruction}"},
                                 {"role": "assistant", "content": format_click(mx, my)}],
                    "images": [name],
                    "user": user,
                    "kind": kind,
                    "category": APP_CATEGORY[target],
                    "app": target,
                    "objects": {"ref": [target], "bbox": [[x1, y1, x2, y2]]},
                    "target": {"box": [x1, y1, x2, y2], "point": [cx, cy], "size": [width, height]},
                })
        rows_by_split[split][user] = made

    for u in train_ids + test_ids:
        emit("train", u, samples_per_user)
    for u in test_ids:
        emit("test", u, test_per_user)

    files = {}
    for split, by_user in rows_by_split.items():
        path = out / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for user in sorted(by_user):
                for row in by_user[user]:
                    f.write(json.dumps(row) + "\n")
        files[split] = str(path)
        if pickles:  # seeds/04 layout: one pickle per user, conversations with image paths in the content
            (out / split).mkdir(exist_ok=True)
            for user, user_rows in by_user.items():
                convs = [_as_content_list(r, out / split) for r in user_rows]
                with open(out / split / f"user_{user}.pkl", "wb") as f:
                    pickle.dump(convs, f)
    (out / "users.json").write_text(json.dumps({u: p.to_dict() for u, p in profiles.items()}, indent=1))
    meta = {"train_users": train_users, "test_users": test_users, "samples_per_user": samples_per_user,
            "test_per_user": test_per_user, "screen": list(screen), "grid": list(grid), "per_screen": per_screen,
            "habit_ratio": habit_ratio, "icons": list(icons), "seed": seed, "convention": convention,
            "screens": screen_no, "train_rows": sum(map(len, rows_by_split["train"].values())),
            "test_rows": sum(map(len, rows_by_split["test"].values()))}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return {**files, **meta, "dir": str(out)}


def _as_content_list(row: dict, pickle_dir: Path) -> dict:
    """A JSONL row as a seeds/04 conversation: content lists with the image path (relative to the pickle)."""
    user_text = row["messages"][0]["content"].replace("<image>", "")
    image = str(Path("..") / row["images"][0])
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": user_text}]},
            {"role": "assistant", "content": [{"type": "text", "text": row["messages"][1]["content"]}]},
        ],
        **{k: v for k, v in row.items() if k not in ("messages", "images")},
    }
