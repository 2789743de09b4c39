"""PNG plots written at the end of a run (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _loss_series(log_history: list[dict]) -> tuple[list, list]:
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return train, evals


def loss_plot_title(log_history: list[dict]) -> str:
    """What the loss plot shows, named after what was logged (a short run may log eval loss only)."""
    train, evals = _loss_series(log_history)
    if train and evals:
        return "train and eval loss"
    if train:
        return "train loss"
    return "eval loss\n(no train loss logged: the run had fewer steps than --logging_steps)"


def plot_loss_curve(log_history: list[dict], path: str | Path, title: str | None = None) -> str | None:
    """Train (and eval, if logged) loss against step from Trainer's log_history; the title says which."""
    train, evals = _loss_series(log_history)
    if not train and not evals:
        return None
    title = title or loss_plot_title(log_history)
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


def plot_grpo_curves(history: list[dict], out_dir: str | Path) -> list[str]:
    """reward.png (mean reward +- std per step, each reward's mean, share of groups whose rewards all tie)
    and kl.png (KL to the reference model, when beta > 0) from `vltune grpo`'s per-step history."""
    rows = [h for h in history if "reward" in h]
    if not rows:
        return []
    plt = _plt()
    out_dir = Path(out_dir)
    steps = [h["step"] for h in rows]
    paths = []
    fig, (ax, ax_tied) = plt.subplots(2, 1, figsize=(6, 6), dpi=100, sharex=True, height_ratios=(3, 1))
    mean = [h["reward"] for h in rows]
    std = [h.get("reward_std") or 0.0 for h in rows]
    ax.plot(steps, mean, label="reward (weighted sum)")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    for key in sorted({k for h in rows for k in h if k.startswith("rewards/") and k.endswith("/mean")}):
        ax.plot(steps, [h.get(key) for h in rows], "--", label=key.split("/")[1])
    ax.set_ylabel("reward")
    ax.set_title("GRPO reward per step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax_tied.plot(steps, [h.get("frac_reward_zero_std") for h in rows], color="gray")
    ax_tied.set_ylim(-0.05, 1.05)
    ax_tied.set_ylabel("groups tied")
    ax_tied.set_xlabel("step")
    ax_tied.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "reward.png")
    plt.close(fig)
    paths.append(str(out_dir / "reward.png"))
    kl = [(h["step"], h["kl"]) for h in rows if h.get("kl") is not None]
    if kl:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(*zip(*kl))
        ax.set_xlabel("step")
        ax.set_ylabel("KL to reference")
        ax.set_title("GRPO KL per step")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "kl.png")
        plt.close(fig)
        paths.append(str(out_dir / "kl.png"))
    return paths
