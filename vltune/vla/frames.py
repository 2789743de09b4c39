"""What the policy's backbone reads per frame: the chat prompt around the instruction, and the images --
patchified in torch on the Qwen-VL fast path (checked against the model's own image processor), or through
the processor for other VLMs."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..padding import padded_on
from .config import PolicyConfig

logger = logging.getLogger("vltune")


class FrameInputs:
    """Turns frames (images + instruction) into backbone inputs: left-padded ids, pixels, grids."""

    def __init__(self, processor, config: PolicyConfig):
        self.processor, self.config = processor, config
        self.n_images = len(config.cameras) if config.use_images else 0
        ip = getattr(processor, "image_processor", None)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.qwen = ip is not None and all(hasattr(ip, a) for a in ("merge_size", "patch_size", "temporal_patch_size"))
        self.size = config.image_size
        if self.qwen:  # sizes that are a multiple of one merged token, so the processor keeps them as they are
            factor = ip.patch_size * ip.merge_size
            self.size = max(factor, round(config.image_size / factor) * factor)
            mean, std = ip.image_mean, ip.image_std
            self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
            self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
            self.fast = self.n_images > 0 and self._fast_path_matches()
        else:
            self.fast = False
        self._ids: dict[str, tuple[list[int], list[int] | None]] = {}

    def prompt(self, instruction: str) -> str:
        content = [{"type": "image"} for _ in range(self.n_images)]
        content.append({"type": "text", "text": self.config.instruction_template.format(instruction=instruction)})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def _dummy(self) -> list[np.ndarray]:
        return [np.zeros((self.size, self.size, 3), np.uint8) for _ in range(self.n_images)]

    def ids(self, instruction: str) -> tuple[list[int], list[int] | None]:
        """(input ids, multimodal token types or None) of one frame's prompt, cached per instruction."""
        if instruction not in self._ids:
            text = self.prompt(instruction)
            if self.n_images:
                enc = self.processor(text=[text], images=self._dummy(), return_tensors="pt")
            else:
                enc = self.tokenizer([text], return_tensors="pt")
            types = enc.get("mm_token_type_ids")
            self._ids[instruction] = (enc["input_ids"][0].tolist(), None if types is None else types[0].tolist())
        return self._ids[instruction]

    def patchify(self, images: torch.Tensor) -> dict:
        """Qwen-VL pixel_values/image_grid_thw for uint8 images (M, S, S, 3), as the image processor makes them."""
        ip = self.processor.image_processor
        p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        x = images.permute(0, 3, 1, 2).float().div(255.0)
        x = (x - self.mean) / self.std  # (M, 3, S, S)
        n, c, h, w = x.shape
        gh, gw = h // p, w // p
        x = x.unsqueeze(1).expand(n, tp, c, h, w)  # one image = tp identical temporal frames
        x = x.reshape(n, 1, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        pixel_values = x.reshape(n * gh * gw, c * tp * p * p)
        grid = torch.tensor([[1, gh, gw]], dtype=torch.long).expand(n, 3).contiguous()
        return {"pixel_values": pixel_values, "image_grid_thw": grid}

    def _fast_path_matches(self) -> bool:
        rng = np.random.default_rng(0)
        img = rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
        ref = self.processor.image_processor(images=[img], return_tensors="pt")
        mine = self.patchify(torch.from_numpy(img)[None])
        ok = (ref["pixel_values"].shape == mine["pixel_values"].shape
              and torch.allclose(ref["pixel_values"].float(), mine["pixel_values"], atol=1e-4)
              and torch.equal(ref["image_grid_thw"], mine["image_grid_thw"]))
        if not ok:
            logger.warning("[policy] torch patchify differs from %s: using the processor for every batch (slower)",
                           type(self.processor.image_processor).__name__)
        return ok

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (M, H, W, 3) -> uint8 (M, S, S, 3)."""
        if images.shape[1] == self.size and images.shape[2] == self.size:
            return images
        x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(self.size, self.size), mode="bilinear",
                          antialias=True, align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    def __call__(self, instructions: list[str], images: torch.Tensor | None) -> dict:
        """instructions: one per frame (M); images: uint8 (M, n_cameras, S, S, 3) or None -> backbone kwargs."""
        if self.n_images and not self.fast:
            texts = [self.prompt(i) for i in instructions]
            imgs = [[im.numpy() for im in frame] for frame in images]
            with padded_on(self.processor, "left"):
                return dict(self.processor(text=texts, images=imgs, return_tensors="pt", padding=True))
        rows = [self.ids(i) for i in instructions]
        length = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        types = torch.zeros((len(rows), length), dtype=torch.long) if rows[0][1] is not None else None
        for r, (row, tt) in enumerate(rows):  # left padding: the read-out token is always the last one
            ids[r, length - len(row):] = torch.tensor(row)
            mask[r, length - len(row):] = 1
            if types is not None:
                types[r, length - len(row):] = torch.tensor(tt)
        out = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            out["mm_token_type_ids"] = types
        if self.n_images:
            out.update(self.patchify(images.flatten(0, 1)))
        return out
