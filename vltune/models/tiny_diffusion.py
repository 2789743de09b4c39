"""Embedded tiny Stable Diffusion 3 pipeline and CLIP model for the `clip_sd3` reward, built offline.

Real classes (diffusers' SD3Transformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler;
transformers' CLIPTextModelWithProjection x2, T5EncoderModel, CLIPModel), random weights, local
tokenizers (a character-level CLIP BPE and a character-level T5 unigram), saved with
`save_pretrained` and loaded back through `from_pretrained` exactly like a user's hub id or
directory. They make the reward pipeline runnable without a model hub (tests, dry runs); their
scores carry no meaning. Needs diffusers (`pip install vltune[grpo]`).
"""

from __future__ import annotations

import os
import shutil
import string
from pathlib import Path

import torch

from .tiny import cache_root

TINY_DIFFUSION_VERSION = 1


def _build_into(path: Path, builder) -> str:
    if not (path / "DONE").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        builder(tmp)
        (tmp / "DONE").write_text("ok\n")
        try:
            tmp.rename(path)
        except OSError:
            if not (path / "DONE").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def tiny_sd3_path() -> str:
    """Directory of the tiny SD3 pipeline (32 x 32 images), built on first use."""
    return _build_into(cache_root() / f"sd3-tiny-v{TINY_DIFFUSION_VERSION}", build_tiny_sd3)


def tiny_clip_path() -> str:
    """Directory of the tiny CLIPModel + CLIPProcessor (32 x 32 input), built on first use."""
    return _build_into(cache_root() / f"clip-tiny-v{TINY_DIFFUSION_VERSION}", build_tiny_clip)


def clip_tokenizer(max_length: int = 77):
    """A character-level CLIP tokenizer: every byte-level character, with and without CLIP's end-of-word mark."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 256):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size, projection_dim=32,
                          max_position_embeddings=77)


def build_tiny_sd3(out_dir: str | os.PathLike) -> str:
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    text_1 = CLIPTextModelWithProjection(_clip_text_config(len(tok))).eval()
    text_2 = CLIPTextModelWithProjection(_clip_text_config(len(tok))).eval()
    # T5 width = the transformer's joint_attention_dim; pooled = the two CLIP projections (32 + 32).
    text_3 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=64, out_channels=4).eval()
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=text_1, tokenizer=tok, text_encoder_2=text_2, tokenizer_2=tok,
                                    text_encoder_3=text_3, tokenizer_3=t5_tok)
    pipe.save_pretrained(out_dir)
    return str(out_dir)


def build_tiny_clip(out_dir: str | os.PathLike) -> str:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(0)
    tok = clip_tokenizer()
    text = _clip_text_config(len(tok)).to_dict()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=32, patch_size=8, projection_dim=32)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=32)).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(out_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out_dir)
    return str(out_dir)
