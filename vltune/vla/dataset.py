"""Training windows over episodes, and the collator that turns them into backbone inputs.

A sample is (episode e, frame t): the frames t-W+1 .. t (before the episode start, the first frame is
repeated and masked out of the loss), and for every one of them the next N actions (past the episode end,
masked). Actions are normalised once per episode here (arm dims) and gripper dims become 0/1 targets.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import PolicyConfig
from .data.episodes import Episode
from .normalize import Normalizer


class WindowDataset(torch.utils.data.Dataset):
    def __init__(self, episodes: list[Episode], config: PolicyConfig, normalizers: dict[str, Normalizer]):
        self.config = config
        self.episodes = episodes
        self.actions, self.states = [], []
        for ep in episodes:
            a = ep.actions.copy()
            if "action" in normalizers:
                a = normalizers["action"].normalize(a)
            for i, d in enumerate(config.gripper_dims):
                low, high = config.gripper_values[i]
                a[:, d] = (ep.actions[:, d] > (low + high) / 2).astype(np.float32)
            self.actions.append(a.astype(np.float32))
            if config.state_dim:
                s = ep.state[:, config.state_indices]
                if "state" in normalizers:
                    s = normalizers["state"].normalize(s)
                self.states.append(np.asarray(s, np.float32))
        self.index = [(e, t) for e, ep in enumerate(episodes) for t in range(len(ep))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        e, t = self.index[i]
        cfg, ep = self.config, self.episodes[e]
        w, n = cfg.window_size, cfg.fwd_pred_next_n
        frames = np.arange(t - w + 1, t + 1)
        valid = frames >= 0
        frames = np.maximum(frames, 0)
        acts = self.actions[e]
        steps = frames[:, None] + np.arange(n)[None]  # (W, N) action indices
        mask = (steps < len(acts)) & valid[:, None]
        item = {"actions": acts[np.minimum(steps, len(acts) - 1)], "action_mask": mask,
                "instruction": ep.instruction, "where": f"{ep.source or f'episode {e}'} frame {t}", "index": i}
        if cfg.use_images:
            item["images"] = np.stack([np.stack([np.asarray(ep.images[c][f]) for c in cfg.cameras]) for f in frames])
        if cfg.state_dim:
            item["state"] = self.states[e][frames]
        return item


class WindowCollator:
    """Stacks windows, builds the backbone inputs of every frame, applies random-shift augmentation.

    The shifts are a function of (seed, the batch's window indices) and of nothing else: not of how many
    batches came before. A run resumed from a checkpoint (which skips the batches already trained, without
    collating them) then sees exactly the batches of the uninterrupted run; every epoch still shifts a window
    differently, as the shuffled batches it falls in differ."""

    def __init__(self, frame_inputs, config: PolicyConfig, augment_shift: int = 0, seed: int = 0):
        self.frames, self.config, self.shift, self.seed = frame_inputs, config, augment_shift, seed

    def _generator(self, indices: list) -> torch.Generator:
        import hashlib

        key = hashlib.blake2b(repr((self.seed, indices)).encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(key, "little") & (2**63 - 1))

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random shift (pad by replication, crop back) per image; x uint8 (M, S, S, 3)."""
        s = self.shift
        m, h, w, _ = x.shape
        padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2).float(), (s, s, s, s), mode="replicate")
        dx = torch.randint(0, 2 * s + 1, (m,), generator=gen)
        dy = torch.randint(0, 2 * s + 1, (m,), generator=gen)
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(m)])
        return out.to(torch.uint8).permute(0, 2, 3, 1)

    def __call__(self, items: list[dict]) -> dict:
        b, w = len(items), self.config.window_size
        batch = {"actions": torch.as_tensor(np.stack([it["actions"] for it in items])),
                 "action_mask": torch.as_tensor(np.stack([it["action_mask"] for it in items]))}
        if self.config.state_dim:
            batch["state"] = torch.as_tensor(np.stack([it["state"] for it in items]))
        images = None
        if self.config.use_images:
            x = torch.as_tensor(np.stack([it["images"] for it in items]))  # (B, W, C, H, W', 3)
            c = x.shape[2]
            flat = self.frames.resize(x.flatten(0, 2))
            if self.shift:
                flat = self._augment(flat, self._generator([it.get("index") for it in items]))
            images = flat.view(b * w, c, *flat.shape[1:])
        instructions = [it["instruction"] for it in items for _ in range(w)]
        batch.update(self.frames(instructions, images))
        return batch
