"""Action and state normalisation: statistics from the data, checked, saved with the checkpoint.

Modes (per feature):
- `minmax`: data min/max per dimension -> [-1, 1] (the LeRobot / openpi way; stats.json-style numbers).
- `bounds`: RoboVLMs' `norm_action`: clip to [norm_min, norm_max] (-0.65 / 0.65), rescale to [-1, 1].
- `meanstd`: (x - mean) / std.
- `none`.
Gripper dimensions (`gripper_dims`) are never normalised: they are trained as open/close with BCE.
Statistics are checked before training: NaN or inf anywhere, or a dimension with a near-zero spread that is
not exactly constant under `minmax`/`meanstd`, stops the run with the feature, dimension, episode and frame
named and the fix. An exactly constant dimension is only centred (ordinary robot data: a task mix whose
gripper never moves); the VLA recipe also keeps such action dimensions out of the loss.
`normalization.json` beside the weights holds everything needed to undo it at inference.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

MODES = ("minmax", "bounds", "meanstd", "none")
MIN_SPREAD = 1e-6


class NormalizationError(ValueError):
    pass


@dataclass
class FeatureStats:
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    q01: list[float]
    q99: list[float]
    count: int


def compute_stats(arrays: list[np.ndarray], feature: str, sources: list[str] | None = None) -> FeatureStats:
    """Per-dimension statistics over all rows of all arrays; NaN/inf raise naming the episode and frame."""
    for i, a in enumerate(arrays):
        bad = ~np.isfinite(a)
        if bad.any():
            t, d = map(int, np.argwhere(bad)[0])
            where = sources[i] if sources else f"episode {i}"
            raise NormalizationError(
                f"{feature}: non-finite value {a[t, d]} in {where}, frame {t}, dimension {d}; fix or drop that "
                f"episode before training (`vltune vla` reads every frame, so one bad row poisons the statistics)")
    x = np.concatenate(arrays, 0).astype(np.float64)
    return FeatureStats(mean=x.mean(0).tolist(), std=x.std(0).tolist(), min=x.min(0).tolist(), max=x.max(0).tolist(),
                        q01=np.quantile(x, 0.01, axis=0).tolist(), q99=np.quantile(x, 0.99, axis=0).tolist(),
                        count=int(len(x)))


@dataclass
class Normalizer:
    """Normalises one feature ("action" or "state"); `dims` are the dimensions it applies to."""

    feature: str
    mode: str
    stats: FeatureStats
    dims: list[int] = field(default_factory=list)
    norm_min: float = -1.0
    norm_max: float = 1.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise NormalizationError(f"{self.feature}: unknown normalisation {self.mode!r}; choose one of {MODES}")
        self._check()

    def _check(self) -> None:
        for name in ("mean", "std", "min", "max"):
            v = np.asarray(getattr(self.stats, name), dtype=np.float64)
            if not np.isfinite(v).all():
                d = int(np.argwhere(~np.isfinite(v))[0][0])
                raise NormalizationError(f"{self.feature} statistics: {name}[{d}] = {v[d]} is not finite; "
                                         "recompute them from clean data")
        if self.mode == "bounds" and not self.norm_max > self.norm_min:
            raise NormalizationError(f"{self.feature}: norm_max ({self.norm_max}) must exceed norm_min ({self.norm_min})")
        if self.mode in ("minmax", "meanstd"):
            spread = self._scale_np()
            for d in self.dims:
                if d in self.constant_dims:
                    continue  # exactly constant: centred, not scaled (see _affine)
                if spread[d] < MIN_SPREAD:
                    raise NormalizationError(
                        f"{self.feature} dimension {d} varies, but only by "
                        f"{'std' if self.mode == 'meanstd' else 'max-min'} = {spread[d]:.3g} in the training data: "
                        f"normalising would divide by ~0 and magnify noise. Fix: use --norm_{self.feature} "
                        f"bounds|none, list it in --gripper_dims if it is a gripper command, or drop the dimension")

    @property
    def constant_dims(self) -> list[int]:
        """Dimensions whose every training value is the same (min == max): normalised to 0, never divided."""
        s = self.stats
        return [d for d in self.dims if s.max[d] == s.min[d]]

    def _scale_np(self) -> np.ndarray:
        s = self.stats
        if self.mode == "meanstd":
            return np.asarray(s.std)
        return (np.asarray(s.max) - np.asarray(s.min)) / 2.0

    def _affine(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(center, scale) per dimension; identity outside `dims`."""
        n = len(self.stats.mean)
        center, scale = np.zeros(n), np.ones(n)
        s = self.stats
        constant = set(self.constant_dims) if self.mode in ("minmax", "meanstd") else set()
        for d in self.dims:
            if d in constant:
                center[d] = s.min[d]
            elif self.mode == "meanstd":
                center[d], scale[d] = s.mean[d], s.std[d]
            elif self.mode == "minmax":
                center[d], scale[d] = (s.max[d] + s.min[d]) / 2, (s.max[d] - s.min[d]) / 2
            elif self.mode == "bounds":
                center[d], scale[d] = (self.norm_max + self.norm_min) / 2, (self.norm_max - self.norm_min) / 2
        return (torch.as_tensor(center, dtype=like.dtype, device=like.device),
                torch.as_tensor(scale, dtype=like.dtype, device=like.device))

    def normalize(self, x):
        is_np = isinstance(x, np.ndarray)
        t = torch.as_tensor(x, dtype=torch.float32)
        if self.mode != "none":
            if self.mode == "bounds":
                t = t.clone()
                t[..., self.dims] = t[..., self.dims].clamp(self.norm_min, self.norm_max)
            c, s = self._affine(t)
            t = (t - c) / s
        return t.numpy() if is_np else t

    def unnormalize(self, x):
        is_np = isinstance(x, np.ndarray)
        t = torch.as_tensor(x, dtype=torch.float32)
        if self.mode != "none":
            c, s = self._affine(t)
            t = t * s + c
        return t.numpy() if is_np else t

    def to_dict(self) -> dict:
        return {"feature": self.feature, "mode": self.mode, "dims": self.dims, "norm_min": self.norm_min,
                "norm_max": self.norm_max, "stats": asdict(self.stats)}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(feature=d["feature"], mode=d["mode"], stats=FeatureStats(**d["stats"]), dims=list(d["dims"]),
                   norm_min=d.get("norm_min", -1.0), norm_max=d.get("norm_max", 1.0))


def save_normalizers(normalizers: dict[str, Normalizer], path: str | Path) -> None:
    Path(path).write_text(json.dumps({k: v.to_dict() for k, v in normalizers.items()}, indent=1))


def load_normalizers(path: str | Path) -> dict[str, Normalizer]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: the checkpoint has no normalisation statistics; actions cannot be "
                                "un-normalised (was it saved by `vltune vla`?)")
    return {k: Normalizer.from_dict(v) for k, v in json.loads(p.read_text()).items()}
