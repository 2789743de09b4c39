"""Boards of coloured shapes: the drawing shared by the synthetic data sets (vltune/data/synthetic*.py) and the
tiny model's vision pretraining (vltune/models/tiny.py). Pure PIL; imports nothing of vltune."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 0),
    "purple": (140, 40, 170), "orange": (245, 120, 0),
}
SHAPES = ("circle", "square", "triangle")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=color)


def cell_tint(row: int, col: int, grid: int) -> tuple[int, int, int]:
    """Pastel background of a cell: red falls with the row, blue with the column (a readable position cue)."""
    step = 70 / max(grid - 1, 1)
    return (250 - round(step * row), 238, 250 - round(step * col))


def render_board(rng: random.Random, grid: int, cell: int, n_shapes: int, tint: bool = False):
    """One board: (image, elements) with elements [{color, shape, box, cell}]."""
    size = grid * cell
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    if tint:
        for row in range(grid):
            for col in range(grid):
                draw.rectangle((col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1),
                               fill=cell_tint(row, col, grid))
    cells = rng.sample(range(grid * grid), n_shapes)
    colors = rng.sample(list(COLORS), n_shapes)
    elements = []
    margin = max(2, cell // 5)
    for c, color in zip(cells, colors):
        row, col = divmod(c, grid)
        box = (col * cell + margin, row * cell + margin, (col + 1) * cell - margin - 1, (row + 1) * cell - margin - 1)
        shape = rng.choice(SHAPES)
        draw_shape(draw, shape, box, COLORS[color])
        elements.append({"color": color, "shape": shape, "box": list(box), "cell": c})
    return img, elements
