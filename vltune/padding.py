"""Which side a processor's tokenizer pads on, set for one block: right for training batches, left for
generation (new tokens follow the prompt) and for tail-only logits. Used by the SFT collator, text generation
and the VLA frame inputs; imports nothing of vltune."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def padded_on(processor, side: str):
    """Pad the processor's tokenizer on `side` ("left" | "right") inside the block; restore it afterwards."""
    tok = getattr(processor, "tokenizer", processor)
    before, tok.padding_side = tok.padding_side, side
    try:
        yield tok
    finally:
        tok.padding_side = before
