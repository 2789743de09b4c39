"""The benchmark's tiny Qwen2.5-VL: vltune's tiny builder, with a tokenizer whose special tokens
sit at the real Qwen2.5 ids (151643 ...).

Why: ms-swift hard-codes Qwen's image/video token ids (151655/151656); with vltune's embedded
tiny tokenizer (special tokens at ids 0-13) it silently inserts one image pad token instead of
the grid's count (see shared/reference/peers.md). So the byte-level BPE vocabulary of vltune's
tiny tokenizer is padded with unreachable filler entries up to 151643, and Qwen2.5's 22 added
tokens follow at their real ids. The model is vltune's `xs` (or `s`) Qwen2.5-VL config with
that vocabulary (the embedding / tied lm_head is then 151665 x hidden: the part of a real Qwen
that a tiny model with a small vocabulary would not exercise).

    python benchmarks/bench_model.py OUT_DIR [--size xs]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

BENCH_MODEL_VERSION = 2
# Qwen2.5's added tokens, in id order from 151643 (the first 14 are vltune's QWEN_SPECIAL_TOKENS).
QWEN25_FIRST_SPECIAL_ID = 151643
QWEN25_EXTRA_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                       "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
# The processor class name the benchmark writes into the saved configs; benchmarks/peer_site/
# sitecustomize.py registers a class of that name for the peers (vltune falls back on its own).
PROCESSOR_CLASS = "Qwen2_5_VLImageProcessorOnly"


def qwen_id_tokenizer():
    """vltune's tiny byte-level BPE, padded so that Qwen2.5's special tokens get their real ids."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import Qwen2Tokenizer

    from vltune.models.tiny import QWEN_SPECIAL_TOKENS, build_tokenizer

    bpe = build_tokenizer([], vocab_size=1024)  # no special tokens: they are added at their real ids below
    state = json.loads(bpe.to_str())
    vocab = state["model"]["vocab"]
    n = len(vocab)
    if n >= QWEN25_FIRST_SPECIAL_ID:
        raise RuntimeError(f"tiny BPE vocabulary unexpectedly large ({n})")
    # Filler entries: no merge produces them, so they are never emitted by encoding.
    for i in range(n, QWEN25_FIRST_SPECIAL_ID):
        vocab[f"<|bench_unused_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(state))
    specials = list(QWEN_SPECIAL_TOKENS) + QWEN25_EXTRA_TOKENS
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for k, t in enumerate(specials):
        got = tok.token_to_id(t)
        if got != QWEN25_FIRST_SPECIAL_ID + k:
            raise RuntimeError(f"{t} got id {got}, expected {QWEN25_FIRST_SPECIAL_ID + k}")
    return Qwen2Tokenizer(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, model_max_length=32768,
    )


def build_bench_model(out_dir: str | os.PathLike, size: str = "xs") -> str:
    """Build vltune's tiny Qwen2.5-VL (`size`) with the Qwen-id tokenizer and save it to `out_dir`."""
    import torch

    from vltune.models import tiny

    out = Path(out_dir)
    if (out / "BENCH_MODEL").exists() and (out / "BENCH_MODEL").read_text().strip() == f"{size} v{BENCH_MODEL_VERSION}":
        return str(out)
    torch.manual_seed(0)
    tokenizer = qwen_id_tokenizer()
    original = tiny._qwen_tokenizer
    tiny._qwen_tokenizer = lambda: tokenizer  # vltune's builder, our tokenizer
    try:
        model, processor = tiny._build_qwen("qwen2_5_vl", size)
    finally:
        tiny._qwen_tokenizer = original
    ids = model.config
    assert ids.image_token_id == 151655 and ids.video_token_id == 151656, (ids.image_token_id, ids.video_token_id)
    assert ids.vision_start_token_id == 151652, ids.vision_start_token_id
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    _portable_configs(tmp)
    (tmp / "BENCH_MODEL").write_text(f"{size} v{BENCH_MODEL_VERSION}\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return str(out)


def _portable_configs(path: Path) -> None:
    """Name the processor class the same way in every saved config file (older transformers in the
    peers' venvs read preprocessor_config.json / tokenizer_config.json, newer ones processor_config.json)."""
    proc = path / "processor_config.json"
    if proc.exists() and not (path / "preprocessor_config.json").exists():
        image = json.loads(proc.read_text()).get("image_processor")
        if image:  # transformers < 5.x-ish read the image processor from here
            (path / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = path / name
        if f.exists():
            cfg = json.loads(f.read_text())
            if "processor_class" in cfg or name != "tokenizer_config.json":
                cfg["processor_class"] = PROCESSOR_CLASS
            f.write_text(json.dumps(cfg, indent=2) + "\n")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--size", default="xs", choices=["xs", "s"])
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(build_bench_model(a.out_dir, a.size))
