"""The policy network: a VLM backbone whose last-token hidden state is each frame's feature, and an action head
over the window (+ projected proprio state); saving, and loading the backbone through vltune.models."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import PolicyConfig
from .heads import build_head
from .normalize import Normalizer, save_normalizers

logger = logging.getLogger("vltune")
WEIGHTS_NAME = "policy.safetensors"


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


def backbone_path(spec: str) -> str:
    """A policy's `backbone`: `tiny:<family>:<size>` (the embedded tiny model) or a hub id / directory."""
    from ..models.config import ModelArguments
    from ..models.load import resolve_model_path

    if spec.startswith("tiny:"):
        _, family, size = spec.split(":")
        return resolve_model_path(ModelArguments(model_family=family, tiny_size=size))
    return resolve_model_path(ModelArguments(model=spec))


def load_backbone(spec: str, device: str = "cpu", dtype: str = "float32"):
    """(backbone, processor) through vltune.models (the same loader as sft/grpo), in `dtype`, on `device`."""
    from ..models.config import ModelArguments
    from ..models.load import load_model, load_processor

    path = backbone_path(spec)
    vlm = load_model(path, ModelArguments(model=path, device=device, torch_dtype=dtype), "full", for_training=True)
    return vlm.to(device), load_processor(path)


def attach_lora(vlm: nn.Module, lora: dict) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora.get("dropout", 0.0),
                     target_modules=lora["target_modules"], bias="none")
    return get_peft_model(vlm, cfg)
