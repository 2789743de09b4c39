"""Action heads: map per-frame backbone features (B, W, D) to action chunks (B, W, N, A).

Registered by name and built lazily (`build_head("lstm", ...)`), like RoboVLMs' act_head types:
- `lstm` (RoboVLMs' LSTMDecoder, its default): an LSTM over the history window; each step predicts the next
  N actions from everything seen so far.
- `mlp` (FCDecoder): an MLP on each frame's feature alone (no history mixing; cheapest).
- `gpt` (GPTDecoder): a small causal transformer over the window.
Outputs are raw: arm dimensions are normalised actions, gripper dimensions are logits (BCE at training,
sigmoid > 0.5 at inference).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

HEADS = {
    "lstm": "vltune.vla.heads:LSTMHead",
    "mlp": "vltune.vla.heads:MLPHead",
    "gpt": "vltune.vla.heads:GPTHead",
}
# RoboVLMs act_head.type -> ours
ROBOVLMS_HEADS = {"LSTMDecoder": "lstm", "FCDecoder": "mlp", "GPTDecoder": "gpt"}


def build_head(name: str, in_dim: int, hidden: int, layers: int, action_dim: int, chunk: int, window: int,
               input_norm: str = "layer") -> nn.Module:
    name = ROBOVLMS_HEADS.get(name, name)
    if name not in HEADS:
        raise ValueError(f"unknown action head {name!r}; choose one of {', '.join(HEADS)} "
                         f"(RoboVLMs names: {', '.join(ROBOVLMS_HEADS)}; DiscreteDecoder is not supported)")
    module, cls = HEADS[name].split(":")
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"unknown head input norm {input_norm!r}; choose one of {', '.join(INPUT_NORMS)}")
    return getattr(importlib.import_module(module), cls)(in_dim, hidden, layers, action_dim, chunk, window,
                                                         input_norm)


class FeatureBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the feature dim of (B, W, D) inputs: per-feature statistics over the batch (running ones
    at inference). Unlike a per-frame LayerNorm it removes each feature's constant offset, so a small variation
    that carries the information (where an object is in the image) is not drowned by it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.training and rows.shape[0] < 2:  # one frame (a last batch of 1): no batch statistics, use the running ones
            out = F.batch_norm(rows, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        else:
            out = super().forward(rows)
        return out.view(x.shape)


INPUT_NORMS = {"layer": nn.LayerNorm, "batch": FeatureBatchNorm}


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, o))


class _Head(nn.Module):
    def __init__(self, in_dim: int, hidden: int, layers: int, action_dim: int, chunk: int, window: int,
                 input_norm: str = "layer"):
        super().__init__()
        self.action_dim, self.chunk, self.window = action_dim, chunk, window
        self.inp = nn.Sequential(INPUT_NORMS[input_norm](in_dim), nn.Linear(in_dim, hidden), nn.GELU())
        self.out = _mlp(hidden, hidden, chunk * action_dim)

    def mix(self, h: torch.Tensor) -> torch.Tensor:  # (B, W, H) -> (B, W, H)
        return h

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, w, _ = feats.shape
        h = self.mix(self.inp(feats))
        return self.out(h).view(b, w, self.chunk, self.action_dim)  # (B, W, N, A)


class MLPHead(_Head):
    pass


class LSTMHead(_Head):
    def __init__(self, in_dim, hidden, layers, action_dim, chunk, window, input_norm="layer"):
        super().__init__(in_dim, hidden, layers, action_dim, chunk, window, input_norm)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)

    def mix(self, h):
        return self.lstm(h)[0]


class GPTHead(_Head):
    def __init__(self, in_dim, hidden, layers, action_dim, chunk, window, input_norm="layer"):
        super().__init__(in_dim, hidden, layers, action_dim, chunk, window, input_norm)
        self.pos = nn.Parameter(torch.zeros(1, max(window, 1), hidden))
        block = nn.TransformerEncoderLayer(hidden, nhead=4 if hidden % 4 == 0 else 1, dim_feedforward=hidden * 2,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, num_layers=layers, enable_nested_tensor=False)

    def mix(self, h):
        w = h.shape[1]
        if w > self.pos.shape[1]:
            raise ValueError(f"GPT head built for a window of {self.pos.shape[1]} frames, got {w}")
        mask = nn.Transformer.generate_square_subsequent_mask(w, device=h.device, dtype=h.dtype)
        return self.blocks(h + self.pos[:, :w], mask=mask, is_causal=True)
