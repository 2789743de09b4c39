"""The seeds/05 pipeline as a reward: the VLM rewrites a prompt, Stable Diffusion 3 renders the
rewrite, CLIP scores the image against the *original* prompt.

reward = cosine similarity (-1..1) between CLIP's embedding of the rendered image and of the original
prompt (the row's --original_prompt_column, else the text of the last user turn). A rewrite earns
reward only by making SD3 draw what the user asked for.

- Batched: one SD3 call renders --sd_batch_size rewrites at once; CLIP scores the whole batch in one pass.
- Fair within a group: every rewrite of the same original prompt is rendered from the same noise
  (seed = --seed + step + hash of the original), so a group's rewards differ by the prompt, not the noise.
- Kept out of training: both models are loaded frozen (requires_grad False, eval, no_grad), are
  never attributes of the trained model (so never in its optimizer), and are loaded with DeepSpeed's
  ZeRO-3 `zero.Init` hook switched off, so ZeRO never partitions them; each process holds a full copy.
- --save_reward_images_steps N writes every N-th step's images to <output_dir>/reward_images/step_<N>/
  with an index.jsonl (original, rewrite, reward) for inspection.

--sd_model / --clip_model take a hub id or a local directory; without them the embedded tiny
pipeline and CLIP (random weights, `vltune.models.tiny_diffusion`) are built and used, which runs
offline but scores nothing meaningful. Needs diffusers (`pip install vltune[grpo]`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from pathlib import Path

import torch

from ..hardware import detect_device, resolve_dtype
from .registry import RewardContext, completion_text

logger = logging.getLogger("vltune")


@contextlib.contextmanager
def outside_zero3():
    """Load models as plain full copies even when a ZeRO-3 config is active (transformers would otherwise
    construct them inside deepspeed.zero.Init and partition them like the trained model)."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover - transformers always ships it
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _freeze(module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def last_user_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            return completion_text([message]).strip()
    return ""


class CLIPSD3Reward:
    def __init__(self, ctx: RewardContext):
        try:
            from diffusers import StableDiffusion3Pipeline
        except ImportError as e:
            raise ImportError("the clip_sd3 reward needs diffusers: pip install 'vltune[grpo]' "
                              "(or pip install 'diffusers>=0.30')") from e
        from transformers import CLIPModel

        from ..models.tiny_diffusion import tiny_clip_path, tiny_sd3_path

        a = ctx.args
        self.steps = int(getattr(a, "sd_steps", 4))
        self.size = int(getattr(a, "sd_image_size", 512))
        self.guidance = float(getattr(a, "sd_guidance_scale", 7.0))
        self.batch_size = max(1, int(getattr(a, "sd_batch_size", 8)))
        self.save_every = int(getattr(a, "save_reward_images_steps", 0) or 0)
        self.column = getattr(a, "original_prompt_column", None) or "original_prompt"
        self.seed = int(ctx.extra.get("seed", 0))
        self.out_dir = Path(ctx.output_dir) / "reward_images"
        self.device = torch.device(ctx.extra.get("device") or detect_device("auto"))
        dtype = resolve_dtype(getattr(a, "sd_torch_dtype", "auto"), self.device.type)
        sd_path = getattr(a, "sd_model", None)
        clip_path = getattr(a, "clip_model", None)
        if not sd_path:
            sd_path = tiny_sd3_path()
            self.size = min(self.size, 32)
            logger.warning("[rewards] clip_sd3: no --sd_model given: using the embedded tiny SD3 (random weights, "
                           "scores carry no meaning) at %s", sd_path)
        if not clip_path:
            clip_path = tiny_clip_path()
            logger.warning("[rewards] clip_sd3: no --clip_model given: using the embedded tiny CLIP (random weights) "
                           "at %s", clip_path)
        with outside_zero3():
            dtype_kw = {} if dtype == torch.float32 else {"torch_dtype": dtype}
            self.pipe = StableDiffusion3Pipeline.from_pretrained(sd_path, **dtype_kw).to(self.device)
            self.clip = CLIPModel.from_pretrained(clip_path, dtype=torch.float32).to(self.device)
            self.clip_processor = _load_clip_processor(clip_path)
        self.pipe.set_progress_bar_config(disable=True)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self.pipe, name, None) is not None:
                _freeze(getattr(self.pipe, name))
        _freeze(self.clip)
        logger.info("[rewards] clip_sd3: SD3 %s (%d steps, %d px, guidance %.1f, batch %d), CLIP %s, on %s",
                    sd_path, self.steps, self.size, self.guidance, self.batch_size, clip_path, self.device)

    # ------------------------------------------------------------------ pipeline
    @torch.no_grad()
    def render(self, rewrites: list[str], originals: list[str], step: int = 0) -> list:
        """SD3 images of `rewrites`, batched; the noise of each image is seeded by its original prompt."""
        images = []
        for i in range(0, len(rewrites), self.batch_size):
            chunk = rewrites[i:i + self.batch_size]
            generators = [torch.Generator("cpu").manual_seed(self.seed + step * 1000003 + zlib.crc32(o.encode()))
                          for o in originals[i:i + self.batch_size]]
            out = self.pipe(prompt=chunk, num_inference_steps=self.steps, height=self.size, width=self.size,
                            guidance_scale=self.guidance, generator=generators, output_type="pil")
            images.extend(out.images)
        return images

    @torch.no_grad()
    def score(self, images: list, texts: list[str]) -> list[float]:
        """Cosine similarity between CLIP's image and text embeddings, pairwise (image i with text i)."""
        inputs = self.clip_processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.clip(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (img * txt).sum(-1).tolist()

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        column = kwargs.get(self.column)
        originals = [column[i] if column is not None and column[i] else last_user_text(p)
                     for i, p in enumerate(prompts)]
        rewrites = [completion_text(c).strip() for c in completions]
        step = getattr(kwargs.get("trainer_state"), "global_step", 0) or 0
        images = self.render(rewrites, originals, step)
        rewards = self.score(images, originals)
        if self.save_every and step % self.save_every == 0:
            self._save(step, images, originals, rewrites, rewards)
        return rewards

    def _save(self, step, images, originals, rewrites, rewards) -> None:
        folder = self.out_dir / f"step_{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "index.jsonl", "a", encoding="utf-8") as f:
            start = len(list(folder.glob("*.png")))
            for k, (img, o, r, s) in enumerate(zip(images, originals, rewrites, rewards)):
                name = f"{start + k:03d}.png"
                img.save(folder / name)
                f.write(json.dumps({"image": name, "original_prompt": o, "rewrite": r, "reward": s}) + "\n")


def _load_clip_processor(path: str):
    from transformers import CLIPProcessor

    try:
        return CLIPProcessor.from_pretrained(path)
    except (ImportError, OSError, ValueError):  # the torchvision image processor is unavailable here
        from transformers import CLIPImageProcessorPil, CLIPTokenizer

        return CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(path),
                             tokenizer=CLIPTokenizer.from_pretrained(path))
