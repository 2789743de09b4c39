"""The policy: a VLM backbone that reads each frame (images + instruction), and an action head over the window.

    policy = Policy.from_pretrained("output/vla")
    policy.reset()
    action = policy.step({"static": rgb}, "open the drawer", state)   # un-normalised (action_dim,)

Images: one per camera the policy was trained on, as a dict {camera: image} (or a list in that order, or one
array for a one-camera policy); each uint8 (H, W, 3), float (H, W, 3) in [0, 1], or channels-first (3, H, W)
-- anything else is a ValueError saying what was given (`as_uint8_hwc`). State: the raw proprio vector the
demos recorded (float, at least the trained `state_indices`), normalised here.

Per frame, the backbone gets the chat prompt `<images> What action should the robot take to {instruction}?`
and the hidden state of its last token is the frame's feature (RoboVLMs' "action token" read-out); the
head sees the features of the last `window_size` frames (+ projected proprio state) and predicts a chunk of
`fwd_pred_next_n` actions per frame. At inference the backbone runs once per new frame (features of the
window are kept), and the head re-plans every `exec_steps` steps.

Qwen-VL backbones take a fast path: prompts are tokenised once per instruction and images are patchified in
torch (checked against the model's own image processor when the policy is built); other VLMs go through
their processor each batch.

This module is the runtime (`Policy`); the network is in modeling.py, the per-frame inputs in frames.py.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

import numpy as np
import torch

from .config import PolicyConfig
from .frames import FrameInputs
from .modeling import WEIGHTS_NAME, PolicyModel, attach_lora, load_backbone
from .normalize import Normalizer, load_normalizers

logger = logging.getLogger("vltune")


def as_uint8_hwc(image, camera: str = "image") -> np.ndarray:
    """One camera image as uint8 (H, W, 3), from what robots and simulators send: uint8 HWC (as is), float HWC
    in [0, 1] (x255, rounded), or either of them channels-first (3, H, W); numpy arrays or CPU tensors.
    Anything else is a ValueError that says what was given and what is expected -- never a silent black frame."""
    x = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    expected = "expected uint8 (H, W, 3), float (H, W, 3) in [0, 1], or either channels-first (3, H, W)"
    if x.ndim != 3 or 3 not in (x.shape[0], x.shape[-1]):
        raise ValueError(f"policy.step: camera {camera!r} image has shape {tuple(x.shape)} ({x.dtype}); {expected}")
    if x.shape[-1] != 3:
        x = np.moveaxis(x, 0, -1)  # (3, H, W) -> (H, W, 3)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        low, high = float(np.nanmin(x)), float(np.nanmax(x))
        if not (np.isfinite(x).all() and low >= 0.0 and high <= 1.0):
            raise ValueError(f"policy.step: camera {camera!r} float image spans [{low:.4g}, {high:.4g}]; float "
                             f"images must lie in [0, 1] (pass 0-255 pixels as uint8)")
        return np.rint(x * 255.0).astype(np.uint8)
    raise ValueError(f"policy.step: camera {camera!r} image has dtype {x.dtype}; {expected}")


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
        elif np.ndim(images) == 3:
            images = [images]
        if len(images) != len(self.config.cameras):
            raise ValueError(f"policy.step: got {len(images)} image(s), the policy uses {self.config.cameras}")
        x = torch.stack([torch.as_tensor(as_uint8_hwc(im, cam)) for im, cam in zip(images, self.config.cameras)])
        return self.frames.resize(x)[None]  # (1, C, S, S, 3)

    def _state(self, state) -> torch.Tensor | None:
        if not self.config.state_dim:
            return None
        if state is None:
            raise ValueError("policy.step: this policy was trained with proprio state; pass state=")
        s = np.asarray(state, dtype=np.float32).reshape(-1)
        need = max(self.config.state_indices) + 1
        if s.size < need:
            raise ValueError(f"policy.step: state has {s.size} value(s); this policy reads state indices "
                             f"{self.config.state_indices} of the recorded proprio vector (at least {need} values)")
        s = s[self.config.state_indices]
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
