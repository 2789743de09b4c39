"""The policy: a VLM backbone that reads each frame (images + instruction), and an action head over the window.

    policy = Policy.from_pretrained("output/vla")
    policy.reset()
    action = policy.step({"static": rgb}, "open the drawer", state)   # un-normalised (action_dim,)

Per frame, the backbone gets the chat prompt `<images> What action should the robot take to {instruction}?`
and the hidden state of its last token is the frame's feature (RoboVLMs' "action token" read-out); the
head sees the features of the last `window_size` frames (+ projected proprio state) and predicts a chunk of
`fwd_pred_next_n` actions per frame. At inference the backbone runs once per new frame (features of the
window are kept), and the head re-plans every `exec_steps` steps.

Qwen-VL backbones take a fast path: prompts are tokenised once per instruction and images are patchified in
torch (checked against the model's own image processor when the policy is built); other VLMs go through
their processor each batch.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.template import padded_on
from .config import PolicyConfig
from .heads import build_head
from .normalize import Normalizer, load_normalizers, save_normalizers

logger = logging.getLogger("vltune")
WEIGHTS_NAME = "policy.safetensors"


# ---------------------------------------------------------------------------- backbone inputs
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


# ---------------------------------------------------------------------------- model
def _inner(backbone: nn.Module) -> nn.Module:
    """The VLM without its LM head (PEFT-wrapped or not): returns hidden states."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    return base.model


def feature_dim_of(backbone: nn.Module) -> int:
    cfg = _inner(backbone).config
    text = getattr(cfg, "text_config", cfg)
    return int(text.hidden_size)


def image_token_id(backbone: nn.Module) -> int | None:
    cfg = _inner(backbone).config
    return getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)


class PolicyModel(nn.Module):
    """Backbone + (optional) state encoder + action head; `forward` returns the training loss."""

    STATE_FEATURES = 64
    READOUTS = ("action", "action+image")

    def __init__(self, config: PolicyConfig, backbone: nn.Module):
        super().__init__()
        self.config = config
        self.backbone = backbone
        if config.readout not in self.READOUTS:
            raise ValueError(f"--readout must be one of {self.READOUTS}, got {config.readout!r}")
        self.image_token = image_token_id(backbone)
        self.read_images = config.readout == "action+image" and config.use_images and config.image_tokens > 0
        if config.readout == "action+image" and config.use_images and self.image_token is None:
            raise ValueError("--readout action+image: the backbone's config names no image_token_id")
        d = config.feature_dim or feature_dim_of(backbone)
        config.feature_dim = d
        self.state_proj = (nn.Sequential(nn.Linear(config.state_dim, self.STATE_FEATURES), nn.GELU())
                           if config.state_dim else None)
        per_frame = d * (1 + (config.image_tokens if self.read_images else 0))
        in_dim = per_frame + (self.STATE_FEATURES if config.state_dim else 0)
        self.head = build_head(config.action_head, in_dim, config.head_hidden, config.head_layers,
                               config.action_dim, config.fwd_pred_next_n, config.window_size, config.head_input_norm)
        self.arm = torch.tensor(config.arm_dims, dtype=torch.long)
        self.grip = torch.tensor(config.gripper_dims, dtype=torch.long)

    def encode(self, **backbone_inputs) -> torch.Tensor:
        """(M, D): the last token's final hidden state of each frame's prompt (+ image tokens' states, flattened)."""
        h = _inner(self.backbone)(**backbone_inputs, use_cache=False).last_hidden_state
        feats = h[:, -1]
        if self.read_images:
            is_image = backbone_inputs["input_ids"] == self.image_token  # (M, L); same count in every frame
            n = self.config.image_tokens
            img = h[is_image].view(h.shape[0], n, h.shape[-1])  # (M, n, D) in raster order
            feats = torch.cat([feats, img.flatten(1)], -1)
        return feats.float()

    def act(self, feats: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """feats (B, W, D), state (B, W, S) -> raw head output (B, W, N, A)."""
        if self.state_proj is not None:
            feats = torch.cat([feats, self.state_proj(state)], -1)
        return self.head(feats)

    def forward(self, input_ids, attention_mask, actions, action_mask, pixel_values=None, image_grid_thw=None,
                state=None, pixel_attention_mask=None, mm_token_type_ids=None):
        b, w = actions.shape[:2]
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        for k, v in (("pixel_values", pixel_values), ("image_grid_thw", image_grid_thw),
                     ("pixel_attention_mask", pixel_attention_mask), ("mm_token_type_ids", mm_token_type_ids)):
            if v is not None:
                kw[k] = v
        feats = self.encode(**kw).view(b, w, -1)
        pred = self.act(feats, state)
        return {"loss": self.loss(pred, actions, action_mask), "pred": pred}

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """arm (Huber | MSE) + arm_gripper_loss_ratio * gripper BCE, averaged over unmasked (B, W, N) entries."""
        mask = mask.float()
        denom = mask.sum().clamp(min=1.0)
        arm, grip = self.arm.to(pred.device), self.grip.to(pred.device)
        total = pred.new_zeros(())
        if len(arm):
            fn = F.huber_loss if self.config.arm_loss == "huber" else F.mse_loss
            per = fn(pred[..., arm], target[..., arm], reduction="none").mean(-1)
            total = total + (per * mask).sum() / denom
        if len(grip):
            per = F.binary_cross_entropy_with_logits(pred[..., grip], target[..., grip], reduction="none").mean(-1)
            total = total + self.config.arm_gripper_loss_ratio * (per * mask).sum() / denom
        return total

    # ---------------------------------------------------------------- saving
    def weights_to_save(self) -> dict[str, torch.Tensor]:
        """Full state for full fine-tuning; otherwise only what is not the base VLM (adapter + head + state)."""
        keep_all = self.config.train_type == "full"
        out = {}
        for name, t in self.state_dict().items():
            if keep_all or not name.startswith("backbone.") or "lora_" in name:
                out[name] = t.detach().to("cpu").contiguous().clone()  # clone: tied embeddings share memory
        return out

    def save_pretrained(self, directory: str | Path, normalizers: dict[str, Normalizer] | None = None) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.weights_to_save(), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        self.config.save(directory)
        if normalizers is not None:
            save_normalizers(normalizers, directory / "normalization.json")


# ---------------------------------------------------------------------------- building
def backbone_path(spec: str) -> str:
    if spec.startswith("tiny:"):
        from ..models.tiny import tiny_model_path

        _, family, size = spec.split(":")
        return tiny_model_path(family, size)
    return spec


def load_backbone(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForImageTextToText

    from ..models.load import load_processor

    path = backbone_path(spec)
    vlm = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    if getattr(vlm.config, "use_cache", None):
        vlm.config.use_cache = False
    return vlm.to(device), load_processor(path)


def attach_lora(vlm: nn.Module, lora: dict) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora.get("dropout", 0.0),
                     target_modules=lora["target_modules"], bias="none")
    return get_peft_model(vlm, cfg)


# ---------------------------------------------------------------------------- inference
class Policy:
    """Closed-loop control: keeps the history window, re-plans from chunks, returns raw actions."""

    def __init__(self, model: PolicyModel, frames: FrameInputs, normalizers: dict[str, Normalizer],
                 device: str = "cpu"):
        self.model, self.frames, self.normalizers, self.device = model.eval(), frames, normalizers, device
        self.config = model.config
        self.reset()

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> Policy:
        from safetensors.torch import load_file

        directory = Path(directory)
        config = PolicyConfig.load(directory)
        vlm, processor = load_backbone(config.backbone, "cpu")
        if config.train_type == "lora":
            vlm = attach_lora(vlm, config.lora)
        model = PolicyModel(config, vlm)
        weights = directory / WEIGHTS_NAME
        if not weights.exists():
            raise FileNotFoundError(f"{weights} not found: {directory} is not a saved policy")
        state = load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{weights}: {len(unexpected)} saved tensors fit no parameter of the rebuilt policy "
                             f"(e.g. {unexpected[0]}); was it saved with another backbone or head?")
        should = set(model.weights_to_save())
        lost = [k for k in missing if k in should]
        if lost:
            raise ValueError(f"{weights}: {len(lost)} policy tensors are missing (e.g. {lost[0]})")
        model.to(device)
        return cls(model, FrameInputs(processor, config), load_normalizers(directory / "normalization.json"), device)

    def reset(self) -> None:
        """Call at the start of every episode: clears the history window and the pending chunk."""
        self._feats: deque = deque(maxlen=self.config.window_size)
        self._states: deque = deque(maxlen=self.config.window_size)
        self._plan: list[np.ndarray] = []

    def _frame_images(self, images) -> torch.Tensor | None:
        if not self.config.use_images:
            return None
        if isinstance(images, dict):
            missing = [c for c in self.config.cameras if c not in images]
            if missing:
                raise ValueError(f"policy.step: camera(s) {missing} missing; the policy was trained on "
                                 f"{self.config.cameras} (pass a dict {{camera: HxWx3 uint8}})")
            images = [images[c] for c in self.config.cameras]
        elif isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        if len(images) != len(self.config.cameras):
            raise ValueError(f"policy.step: got {len(images)} image(s), the policy uses {self.config.cameras}")
        x = torch.stack([torch.as_tensor(np.asarray(im, dtype=np.uint8)) for im in images])  # (C, H, W, 3)
        return self.frames.resize(x)[None]  # (1, C, S, S, 3)

    def _state(self, state) -> torch.Tensor | None:
        if not self.config.state_dim:
            return None
        if state is None:
            raise ValueError("policy.step: this policy was trained with proprio state; pass state=")
        s = np.asarray(state, dtype=np.float32)[self.config.state_indices]
        if "state" in self.normalizers:
            s = self.normalizers["state"].normalize(s)
        return torch.as_tensor(s, dtype=torch.float32)

    @torch.no_grad()
    def observe(self, images, instruction: str, state=None) -> None:
        """Add one frame to the history window (runs the backbone once)."""
        kw = self.frames([instruction], self._frame_images(images))
        kw = {k: v.to(self.device) for k, v in kw.items()}
        self._feats.append(self.model.encode(**kw)[0])
        self._states.append(self._state(state))

    @torch.no_grad()
    def predict_chunk(self) -> np.ndarray:
        """(N, action_dim) raw actions from the current window (pads the start by repeating the first frame)."""
        feats, states = list(self._feats), list(self._states)
        pad = self.config.window_size - len(feats)
        feats, states = [feats[0]] * pad + feats, [states[0]] * pad + states
        f = torch.stack(feats)[None]
        s = torch.stack(states)[None].to(self.device) if self.config.state_dim else None
        out = self.model.act(f, s)[0, -1].float().cpu()  # (N, A): the last frame's chunk
        return self.decode(out)

    def decode(self, out: torch.Tensor) -> np.ndarray:
        a = out.clone()
        for i, d in enumerate(self.config.gripper_dims):
            low, high = self.config.gripper_values[i]
            a[:, d] = torch.where(torch.sigmoid(out[:, d]) > 0.5, torch.tensor(high), torch.tensor(low))
        if "action" in self.normalizers:
            a = self.normalizers["action"].unnormalize(a)
        for d, v in zip(self.config.constant_dims, self.config.constant_values):
            a[:, d] = v  # constant in every demo: output as recorded
        return a.numpy()

    def step(self, images, instruction: str, state=None) -> np.ndarray:
        """One control step: observe the frame, re-plan if the chunk is used up, return the next raw action.

        With window_size 1 and exec_steps k > 1 the backbone runs only every k-th step (real-time control);
        with a longer window every frame is encoded, since the head needs consecutive frames.
        """
        if self._plan and self.config.window_size == 1:
            return self._plan.pop(0)
        self.observe(images, instruction, state)
        if not self._plan:
            chunk = self.predict_chunk()
            self._plan = list(chunk[: max(1, min(self.config.exec_steps, len(chunk)))])
        return self._plan.pop(0)
