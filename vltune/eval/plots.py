"""PNG plots written at the end of a run (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(log_history: list[dict], path: str | Path, title: str = "training loss") -> str | None:
    """Training (and eval, if logged) loss against step from Trainer's log_history."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_clicks(items: list[dict], path: str | Path, columns: int = 4, title: str | None = None) -> str:
    """A grid of screenshots with the target box (green), the true click (green dot) and the
    predicted click (red cross; none if unparseable). items: {image, box, truth, pred, ok}."""
    plt = _plt()
    rows = max(1, (len(items) + columns - 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), dpi=90, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, it in zip(axes.flat, items):
        img = it["image"]
        ax.imshow(img)
        if it.get("box"):
            x1, y1, x2, y2 = it["box"]
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=2))
        if it.get("truth"):
            ax.plot(*it["truth"], "o", color="lime", markersize=6)
        if it.get("pred"):
            ax.plot(*it["pred"], "x", color="red", markersize=10, mew=3)
        ax.set_title(("OK " if it.get("ok") else "MISS ") + it.get("label", "")[:34], fontsize=8,
                     color="green" if it.get("ok") else "red")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
