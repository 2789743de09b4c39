"""Embedded tiny models: real architectures, real processors, built offline.

With no `--model`, every command uses a tiny model of the chosen family
(`--model_family qwen3_vl` by default). It is built here once (a byte-level BPE
tokenizer trained on the fly, the family's real chat template shipped by TRL,
the family's real image processor, a randomly initialised model from the
family's config class), saved to a cache directory, and then loaded through
exactly the same `from_pretrained` path as a user's checkpoint.

Cache: `$VLTUNE_CACHE` or `~/.cache/vltune/tiny/<family>-<size>-v<version>`.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("vltune")

TINY_VERSION = 4  # bump when a builder changes, so stale caches are not reused
TINY_FAMILIES = ("qwen3_vl", "qwen2_5_vl", "qwen2_vl", "idefics3")
# xs: unit tests (~0.3 M params, random weights). s: the demo (~2.5 M params) with a *pretrained vision tower*
# (see `pretrain_vision`); its language model stays random, so everything it answers is learned by SFT.
TINY_SIZES = ("xs", "s")
PRETRAIN_STEPS = 300  # vision-tower pretraining steps of the `s` model (see pretrain_vision)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
IDEFICS3_SPECIAL_TOKENS = (
    ["<|begin_of_text|>", "<|endoftext|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
)
# Qwen2's pre-tokenizer split: digits one at a time, words with one leading symbol.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def cache_root() -> Path:
    return Path(os.environ.get("VLTUNE_CACHE", Path.home() / ".cache" / "vltune")) / "tiny"


def tiny_model_path(family: str = "qwen3_vl", size: str = "xs") -> str:
    """Return the directory of the embedded tiny model, building it on first use."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"no embedded tiny model for family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    if size not in TINY_SIZES:
        raise ValueError(f"tiny model size must be one of {TINY_SIZES}, got {size!r}")
    path = cache_root() / f"{family}-{size}-v{TINY_VERSION}"
    if not (path / "config.json").exists():
        # Build beside the cache entry and rename it into place, so concurrent builders (parallel
        # test workers, two demos) never see a half-written model; the first rename wins.
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        what = "random weights" if size == "xs" else "pretraining its vision tower, a minute or more on a CPU"
        logger.info("[model] building the embedded tiny %s-%s model (first use only: %s) into %s",
                    family, size, what, path)
        start = time.perf_counter()
        build_tiny_model(family, size, tmp)
        logger.info("[model] built the tiny %s-%s model in %.0f s (cached for later runs)", family, size,
                    time.perf_counter() - start)
        try:
            tmp.rename(path)
        except OSError:
            if not (path / "config.json").exists():
                raise
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


# ---------------------------------------------------------------- tokenizer
def _corpus(seed: int = 0) -> list[str]:
    """Text for the tiny tokenizer: chat roles, GUI and grounding words, numbers."""
    rng = random.Random(seed)
    words = (
        "click tap press select open close the a an on in at of to and or my your this that icon button app menu "
        "settings search home back next submit cancel ok save delete edit share send message mail camera photo "
        "gallery music video map calendar clock weather phone contacts browser store notes file folder list item "
        "text field input box toggle switch checkbox tab bar top bottom left right middle center corner row column "
        "red green blue yellow orange purple pink cyan white black gray brown circle square triangle star cross "
        "shape color large small first second third last usual favourite favorite shortcut preferred one "
        "user assistant system you are a helpful agent screen screenshot image picture describe what where which "
        "answer question yes no move up down go find show point grip gripper arm robot pick place push pull drawer "
        "door window reach target goal object task instruction prompt rewrite detailed photo realistic style "
        "light dark quick brown fox jumps over lazy dog hello world"
    ).split()
    lines = []
    for _ in range(3000):
        n = rng.randint(3, 12)
        sent = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.5:
            sent = sent.capitalize() + rng.choice([".", "?", "!", ":", ","])
        lines.append(sent)
        lines.append(f"click({rng.randint(0, 1000)}, {rng.randint(0, 1000)})")
        lines.append(f"[{rng.randint(0, 999)}, {rng.randint(0, 999)}, {rng.randint(0, 999)}, {rng.randint(0, 999)}]")
    lines += ["user\n", "assistant\n", "system\n", "User:", "Assistant:", "System:", "User: ", "Assistant: "] * 50
    return lines


def build_tokenizer(special_tokens: list[str], vocab_size: int = 1024, qwen_style: bool = True):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if qwen_style:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


# ---------------------------------------------------------------- chat templates
def _trl_template(name: str) -> str:
    """The family's real chat template, as TRL ships it (data, read at run time)."""
    import trl

    path = Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja"
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------- builders
def build_tiny_model(family: str, size: str, out_dir: str | os.PathLike) -> str:
    """Build and save a tiny model + processor of `family` to `out_dir`."""
    torch.manual_seed(0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if family == "idefics3":
        model, processor = _build_idefics3(size)
    else:
        model, processor = _build_qwen(family, size)
    if size == "s":
        pretrain_vision(model, processor, steps=PRETRAIN_STEPS)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    (out_dir / "VLTUNE_TINY").write_text(f"{family} {size} v{TINY_VERSION}\n")
    return str(out_dir)


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    tok = build_tokenizer(QWEN_SPECIAL_TOKENS)
    return Qwen2Tokenizer(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, model_max_length=32768,
    )


def _build_qwen(family: str, size: str):
    from transformers import Qwen2VLImageProcessorPil

    from .processors import IMAGE_ONLY_PROCESSORS

    tokenizer = _qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab = len(tokenizer)
    patch = 16 if family == "qwen3_vl" else 14
    # min/max pixels keep demo-sized screenshots at a handful of image tokens.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, temporal_patch_size=2, merge_size=2,
        size={"shortest_edge": 4 * (2 * patch) ** 2, "longest_edge": 256 * (2 * patch) ** 2},
    )
    hidden, layers, heads, kv, head_dim, v_hidden, v_depth, v_heads = {
        "xs": (64, 2, 4, 2, 16, 32, 2, 2),
        "s": (128, 4, 4, 2, 32, 128, 2, 4),
    }[size]
    common_ids = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=4096,
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
        tie_word_embeddings=True,
    )
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        quarter = head_dim // 2
        text["rope_parameters"] = {
            "rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
            "mrope_section": [quarter // 2, quarter // 4, quarter - quarter // 2 - quarter // 4],
        }
        vision = dict(
            depth=v_depth, hidden_size=v_hidden, intermediate_size=v_hidden * 2, num_heads=v_heads,
            patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
            num_position_embeddings=64, deepstack_visual_indexes=[0],
        )
        config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **common_ids)
        model = Qwen3VLForConditionalGeneration(config)
        template = _trl_template("qwen3_vl")
    else:
        quarter = head_dim // 2
        text["rope_parameters"] = {
            "rope_type": "default", "rope_theta": 1e6,
            "mrope_section": [quarter - 2 * (quarter * 3 // 8), quarter * 3 // 8, quarter * 3 // 8],
        }
        if family == "qwen2_5_vl":
            from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model

            vision = dict(
                depth=v_depth, hidden_size=v_hidden, intermediate_size=v_hidden * 2, num_heads=v_heads,
                patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                window_size=56, fullatt_block_indexes=[v_depth - 1],
            )
        else:
            from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model

            vision = dict(
                depth=v_depth, embed_dim=v_hidden, hidden_size=hidden, mlp_ratio=2, num_heads=v_heads,
                patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
            )
        config = Config(text_config=text, vision_config=vision, tie_word_embeddings=True, **common_ids)
        model = Model(config)
        template = _trl_template("qwen2_5_vl")
    processor = IMAGE_ONLY_PROCESSORS[family](image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    return model.eval(), processor


def _build_idefics3(size: str):
    from transformers import (
        Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor,
        PreTrainedTokenizerFast,
    )

    tok = build_tokenizer(IDEFICS3_SPECIAL_TOKENS, qwen_style=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>", model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_SPECIAL_TOKENS[2:]})
    hidden, layers, heads, kv, v_hidden, v_depth, v_heads = {
        "xs": (64, 2, 4, 2, 32, 2, 2), "s": (128, 4, 4, 2, 128, 2, 4)}[size]
    # xs: 64 px = 4 image tokens; s: 128 px = 16 tokens of 32 px, like the Qwen3-VL tiny model.
    image_size, patch, scale = (64 if size == "xs" else 128), 16, 2
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size},
    )
    config = Idefics3Config(
        vision_config=dict(hidden_size=v_hidden, intermediate_size=v_hidden * 2, num_hidden_layers=v_depth,
                           num_attention_heads=v_heads, image_size=image_size, patch_size=patch),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=4096,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<end_of_utterance>"),
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=scale, tie_word_embeddings=False,
    )
    model = Idefics3ForConditionalGeneration(config)
    seq_len = (image_size // patch) ** 2 // scale**2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len,
                                  chat_template=_trl_template("idefics3"))
    return model.eval(), processor


# ---------------------------------------------------------------- vision head start
def vision_cell_pixels(config) -> int:
    """Edge in pixels of the image area that one vision token (after merging) covers."""
    vc = config.vision_config
    if hasattr(vc, "spatial_merge_size"):
        return vc.patch_size * vc.spatial_merge_size
    return vc.patch_size * getattr(config, "scale_factor", 1)


def image_tokens(model, processor, images) -> torch.Tensor:
    """Vision features as the LLM receives them: (n_images, tokens, hidden), tokens in raster order."""
    if hasattr(processor.image_processor, "merge_size"):  # Qwen-VL: patches flattened over the batch
        inputs = processor.image_processor(images=images, return_tensors="pt")
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.stack(list(feats))
    inputs = processor.image_processor(images=images, return_tensors="pt")
    out = model.model.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"))
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    return feats.reshape(len(images), -1, feats.shape[-1])


def pretrain_vision(model, processor, steps: int = 300, batch_size: int = 32, seed: int = 0) -> float:
    """Give the tiny model's vision tower + aligner a head start; return the final dense accuracy.

    A from-scratch tiny VLM does not learn to read *where* things are in a few CPU minutes (stack.md's
    calibration: clicks stay at chance): with position added to every token, the position of one object
    cancels out of any average over tokens until attention has already learned to pick it out. So the
    vision side is pretrained here, like a detection-pretrained encoder: each output token is trained to
    name what it shows, jointly with where it is -- "empty", or (colour, cell) -- on random boards of
    shapes. The language model is untouched (random); instructions, the answer format and the click
    coordinates are all left to SFT.
    """
    from ..boards import COLORS, render_board

    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    cell = vision_cell_pixels(model.config)
    grid = 4
    colors = list(COLORS)
    hidden = model.config.text_config.hidden_size
    head = torch.nn.Linear(hidden, 1 + len(colors) * grid * grid)
    torch.nn.init.normal_(head.weight, std=0.02, generator=g)
    vision = [p for n, p in model.named_parameters() if n.startswith(("model.visual", "model.vision_model", "model.connector"))]
    opt = torch.optim.AdamW(vision + list(head.parameters()), lr=3e-3)
    model.train()
    acc = 0.0
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc="[model] pretraining the tiny vision tower", unit="step", file=sys.stderr,
               mininterval=1.0)
    for _ in bar:
        images, targets = [], []
        for _ in range(batch_size):
            img, elements = render_board(rng, grid, cell, rng.randint(1, 4), tint=rng.random() < 0.5)
            t = torch.zeros(grid * grid, dtype=torch.long)
            for e in elements:
                t[e["cell"]] = 1 + colors.index(e["color"]) * grid * grid + e["cell"]
            images.append(img)
            targets.append(t)
        logits = head(image_tokens(model, processor, images))  # (B, grid*grid, classes)
        target = torch.stack(targets)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = float((logits.argmax(-1) == target).float().mean())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}", refresh=False)
    bar.close()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return acc
