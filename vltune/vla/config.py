"""The saved policy config (PolicyConfig: what a trained policy is, written beside its weights) and the index-list
parser it shares with the arguments. The arguments of `vltune vla` are in vltune/train/vla_config.py."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class PolicyConfig:
    """Everything `Policy.from_pretrained` needs, saved as policy_config.json beside the weights."""

    backbone: str  # path or hub id of the VLM; "tiny:<family>:<size>" for the embedded tiny model
    train_type: str  # lora | full | frozen
    lora: dict  # r, alpha, dropout, target module names (to rebuild the adapter structure)
    action_head: str
    head_hidden: int
    head_layers: int
    window_size: int
    fwd_pred_next_n: int
    exec_steps: int
    action_dim: int
    gripper_dims: list[int]
    gripper_values: list[list[float]]  # per gripper dim: [closed/low, open/high] raw values
    state_dim: int  # after state_dims selection; 0 = no state
    state_indices: list[int]
    cameras: list[str]
    image_size: int
    use_images: bool
    arm_loss: str
    arm_gripper_loss_ratio: float
    feature_dim: int = 0
    readout: str = "action"
    head_input_norm: str = "layer"  # policies saved before this option existed used LayerNorm
    image_tokens: int = 0  # image tokens per frame (all cameras), for the action+image read-out
    instruction_template: str = "What action should the robot take to {instruction}?"
    # action dimensions that never vary in the training data: left out of the loss, output as that value
    constant_dims: list[int] = field(default_factory=list)
    constant_values: list[float] = field(default_factory=list)

    def save(self, directory: str | Path) -> None:
        Path(directory, "policy_config.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> PolicyConfig:
        p = Path(directory, "policy_config.json")
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: is {directory} a `vltune vla` output or checkpoint directory?")
        d = json.loads(p.read_text())
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_json_string(self) -> str:  # what Trainer's TensorBoard callback logs as the model config
        return json.dumps(asdict(self), indent=1)

    @property
    def arm_dims(self) -> list[int]:
        return [d for d in range(self.action_dim) if d not in self.gripper_dims and d not in self.constant_dims]


def parse_index_list(value: str | list | None, what: str, limit: int) -> list[int] | None:
    """'6' / '6,13' / 'none' / [6] -> [indices] (None for 'auto'/'all'); every index must be < limit."""
    if value is None or value in ("auto", "all"):
        return None
    if isinstance(value, str):
        value = [] if value.strip().lower() in ("none", "") else [int(v) for v in value.split(",")]
    idx = [int(v) for v in value]
    bad = [i for i in idx if not -limit <= i < limit]
    if bad:
        raise ValueError(f"{what}: index {bad[0]} is out of range for {limit} dimensions")
    return sorted({i % limit for i in idx})
