"""What the machine offers a run: CPU threads for torch (device and dtype detection belongs here too)."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` torch CPU threads (None or 0: leave the setting alone), then put the old one back,
    so a command called from Python (a notebook, a test) does not change the caller's process."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
