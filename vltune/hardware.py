"""What the machine offers a run: the device, the dtype it supports, and CPU threads for torch (plain values in,
torch objects out)."""

from __future__ import annotations

from .errors import UsageError

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


def detect_device(requested: str = "auto") -> str:
    import torch

    if requested and requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(requested: str, device: str):
    import torch

    if requested in (None, "", "auto"):
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
    if requested not in table:
        raise UsageError(f"--torch_dtype must be auto, bfloat16, float16 or float32, got {requested!r}")
    return table[requested]
