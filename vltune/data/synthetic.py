"""The demo's synthetic grounding set: "click the red circle" on a grid of coloured shapes.

Designed to be readable for a tiny model trained from scratch in minutes on a
CPU (see stack.md's calibration: free-form clicks at random positions plateau
near chance). The canvas is a GRID x GRID board of cells, one vision token per
cell (cell = patch x merge pixels); each image holds a few shapes of distinct
colours in distinct cells, and the answer is the centre of the named shape's
cell in the family's coordinate convention. Written as ms-swift JSONL + PNGs,
so the demo trains through the same readers as a user's data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..boards import render_board

TEMPLATES = ("Click the {color} {shape}", "Tap the {color} {shape}", "Select the {color} {shape}")

def make_grounding_set(out_dir: str | Path, n_train: int = 2000, n_test: int = 200, grid: int = 4, cell: int = 32,
                       n_shapes: int = 3, seed: int = 0, convention: str = "rel1000", processor=None,
                       tint: bool = False) -> dict:
    """Write train.jsonl / test.jsonl (+ images/) under out_dir; return their paths and the task facts.

    Each board holds 1..n_shapes shapes (uniformly), so easy boards teach where-to-click while boards
    with distractors teach following the instruction.
    """
    from ..coords import format_click, to_model_coords

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    size = grid * cell
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        path = out / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n):
                img, elements = render_board(rng, grid, cell, rng.randint(1, n_shapes), tint=tint)
                target = rng.choice(elements)
                name = f"images/{split}_{i:05d}.png"
                img.save(out / name)
                x1, y1, x2, y2 = target["box"]
                row, col = divmod(target["cell"], grid)
                cx, cy = (col + 0.5) * cell, (row + 0.5) * cell  # cell centre, px
                mx, my = to_model_coords(cx, cy, size, size, convention, processor)
                instruction = rng.choice(TEMPLATES).format(color=target["color"], shape=target["shape"])
                row_out = {
                    "messages": [
                        {"role": "user", "content": f"<image>{instruction}"},
                        {"role": "assistant", "content": format_click(mx, my)},
                    ],
                    "images": [name],
                    "objects": {"ref": [f"{target['color']} {target['shape']}"], "bbox": [[x1, y1, x2, y2]]},
                    "target": {"box": [x1, y1, x2, y2], "point": [cx, cy], "size": [size, size]},
                }
                f.write(json.dumps(row_out) + "\n")
        files[split] = str(path)
    meta = {"grid": grid, "cell": cell, "n_shapes": n_shapes, "image_size": size, "convention": convention,
            "n_train": n_train, "n_test": n_test, "seed": seed}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return {**files, **meta}
