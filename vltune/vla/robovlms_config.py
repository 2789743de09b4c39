"""Read a RoboVLMs JSON config (with `parent` inheritance) and map its keys onto `vltune vla` arguments.

    vltune vla --config configs/calvin_finetune/finetune_kosmos_cont-lstm-post_full-ft_text_vision_wd-0_ws-8_act-10.json

Every key is either mapped (listed in the log with its new name) or reported as ignored, with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

ROBOVLMS_MARKERS = ("act_head", "train_setup", "fwd_pred_next_n", "arm_gripper_loss_ratio")


def is_robovlms_config(data: dict) -> bool:
    return any(k in data for k in ROBOVLMS_MARKERS) or isinstance(data.get("trainer"), dict)


def _deep_merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for k, v in child.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_with_parents(path: str | Path, _seen: tuple = ()) -> dict:
    """The config with its `parent` chain merged in (the child's keys win), as RoboVLMs does."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ValueError(f"{path}: circular `parent` chain: {' -> '.join(map(str, _seen))}")
    data = json.loads(path.read_text(encoding="utf-8"))
    parent = data.pop("parent", None)
    if parent:
        candidates = [Path(parent), path.parent / parent, path.parent / Path(parent).name]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise FileNotFoundError(f"{path}: parent config {parent!r} not found (looked at "
                                    f"{', '.join(map(str, candidates))})")
        data = _deep_merge(load_with_parents(found, _seen + (path.resolve(),)), data)
    return data


def _truthy(v) -> bool:
    return v is True or str(v).lower() in ("1", "true", "yes")


def map_robovlms(cfg: dict, cuda: bool = False) -> tuple[dict, list[str], list[str]]:
    """(our arguments, 'key -> ours' lines, 'key: why ignored' lines)."""
    ours: dict = {}
    mapped: list[str] = []
    ignored: list[str] = []

    def put(src: str, name: str, value) -> None:
        ours[name] = value
        mapped.append(f"{src} -> --{name} {value}")

    def skip(src: str, why: str) -> None:
        ignored.append(f"{src}: {why}")

    simple = {"window_size": "window_size", "fwd_pred_next_n": "fwd_pred_next_n", "learning_rate": "learning_rate",
              "min_lr_scale": "min_lr_scale", "weight_decay": "weight_decay", "seed": "seed",
              "batch_size": "per_device_train_batch_size", "arm_gripper_loss_ratio": "arm_gripper_loss_ratio",
              "image_size": "image_size", "norm_min": "norm_min", "norm_max": "norm_max", "model_path": "model",
              "output_root": "output_dir", "log_root": "logging_dir", "use_hand_rgb": "use_gripper_camera",
              "num_workers": "dataloader_num_workers", "gradient_clip_val": "max_grad_norm"}
    _warmup(cfg, put, skip)
    for key, value in cfg.items():
        if key in simple:
            if value is None or value == "":
                skip(key, "empty")
            else:
                put(key, simple[key], value)
        elif key == "norm_action":
            put(key, "norm_action", "bounds" if _truthy(value) else "none")
        elif key == "resume":
            if value:
                put(key, "resume_from_checkpoint", value)
            else:
                skip(key, "empty")
        elif key == "optimizer":
            if str(value).lower() in ("adamw", "adam"):
                mapped.append(f"optimizer {value} -> AdamW (the Trainer's optimizer)")
            else:
                skip(key, f"{value!r} not supported; AdamW is used")
        elif key in ("warmup_epochs", "warmup_steps", "warmup_ratio"):
            continue  # _warmup
        elif key == "act_head" and isinstance(value, dict):
            for k, v in value.items():
                if k == "type":
                    put("act_head.type", "action_head", v)
                elif k == "hidden_size":
                    put("act_head.hidden_size", "head_hidden", v)
                elif k == "action_space":
                    if v != "continuous":
                        raise ValueError(f"act_head.action_space {v!r}: only continuous actions are supported")
                    mapped.append("act_head.action_space continuous -> (continuous actions)")
                elif k == "action_dim":
                    skip("act_head.action_dim", f"{v}: read from the data (any dimension works); gripper dims via "
                         "--gripper_dims (RoboVLMs hard-codes index 6)")
                elif k in ("with_history", "history_type"):
                    skip(f"act_head.{k}", "the head always sees the window (RoboVLMs' post history)")
                else:
                    skip(f"act_head.{k}", "no counterpart")
        elif key == "train_setup" and isinstance(value, dict):
            lora = _truthy(value.get("lora_enable", False))
            frozen = _truthy(value.get("freeze_backbone", False))
            put("train_setup.lora_enable/freeze_backbone", "train_type",
                "lora" if lora else "frozen" if frozen else "full")
            for k, v in value.items():
                if k in ("lora_enable", "freeze_backbone"):
                    continue
                if k == "train_vision":
                    put("train_setup.train_vision", "freeze_vit", not _truthy(v))
                elif k in ("lora_r", "lora_alpha", "lora_dropout"):
                    put(f"train_setup.{k}", {"lora_r": "lora_rank"}.get(k, k), v)
                elif k == "gradient_checkpointing":
                    put("train_setup.gradient_checkpointing", "gradient_checkpointing", _truthy(v))
                elif k == "precision":
                    _precision(f"train_setup.{k}", v, cuda, put, skip)
                elif k in ("predict_forward", "predict_forward_hand") and _truthy(v):
                    skip(f"train_setup.{k}", "forward image prediction is not implemented")
                else:
                    skip(f"train_setup.{k}", "no counterpart")
        elif key == "trainer" and isinstance(value, dict):
            for k, v in value.items():
                if k == "gradient_clip_val":
                    put("trainer.gradient_clip_val", "max_grad_norm", v)
                elif k == "max_epochs":
                    put("trainer.max_epochs", "num_train_epochs", v)
                elif k == "max_steps":
                    if v and int(v) > 0:
                        put("trainer.max_steps", "max_steps", v)
                    else:
                        skip("trainer.max_steps", f"{v}: trainer.max_epochs decides the length")
                elif k == "log_every_n_steps":
                    put("trainer.log_every_n_steps", "logging_steps", v)
                elif k == "logger" and v:
                    kinds = [x for x in (v if isinstance(v, list) else [v]) if x in ("tensorboard", "wandb")]
                    if kinds:
                        put("trainer.logger", "report_to", kinds)
                    else:
                        skip("trainer.logger", f"{v}: TensorBoard and a CSV log are written")
                elif k == "accumulate_grad_batches":
                    put("trainer.accumulate_grad_batches", "gradient_accumulation_steps", v)
                elif k == "precision":
                    _precision("trainer.precision", v, cuda, put, skip)
                elif k == "strategy":
                    stage = "zero3" if "stage_3" in str(v) else "zero2"
                    if "deepspeed" in str(v) and cuda:
                        put("trainer.strategy", "deepspeed", stage)
                    elif "deepspeed" in str(v):
                        skip("trainer.strategy", f"{v} dropped, because DeepSpeed ZeRO needs CUDA GPUs and this machine "
                             f"has none (on a GPU machine it becomes --deepspeed {stage}); training runs on one CPU "
                             "process")
                    else:
                        skip("trainer.strategy", f"{v}: DDP comes from the launcher (torchrun / accelerate launch)")
                else:
                    skip(f"trainer.{k}", "no counterpart")
        elif key in ("train_dataset", "val_dataset") and isinstance(value, dict):
            if key == "train_dataset":
                if value.get("data_dir"):
                    put("train_dataset.data_dir", "dataset", value["data_dir"])
                kind = str(value.get("type", ""))
                if "Calvin" in kind:
                    put("train_dataset.type", "data_format", "calvin")
                elif kind:
                    skip("train_dataset.type", f"{kind}: read as auto-detected CALVIN / LeRobot v3")
            else:
                skip("val_dataset", "validation comes from the data's validation split (--val_split)")
        elif key in ("model", "model_url", "tokenizer", "vlm", "vision_resampler", "exp_name", "task_name"):
            skip(key, "the backbone is --model (family read from its config)")
        elif key in ("fwd_loss_ratio", "fwd_pred_next_n_hand"):
            skip(key, "forward image prediction is not implemented")
        else:
            skip(key, "no counterpart")
    return ours, mapped, ignored


def _warmup(cfg: dict, put, skip) -> None:
    """RoboVLMs has warmup_steps, warmup_ratio and warmup_epochs; our --warmup_steps takes steps, or a ratio of
    the run when below 1 (transformers 5). The first one set wins, in that order."""
    steps, ratio, epochs = cfg.get("warmup_steps"), cfg.get("warmup_ratio"), cfg.get("warmup_epochs")
    max_epochs = (cfg.get("trainer") or {}).get("max_epochs")
    chosen = None
    if steps:
        chosen = ("warmup_steps", int(steps))
    elif ratio:
        chosen = ("warmup_ratio", float(ratio))
    elif epochs and max_epochs:
        chosen = ("warmup_epochs", min(float(epochs) / float(max_epochs), 0.99))
    if chosen:
        put(chosen[0] + ("" if chosen[0] != "warmup_epochs" else f" / trainer.max_epochs {max_epochs}"),
            "warmup_steps", chosen[1])
    for key in ("warmup_steps", "warmup_ratio", "warmup_epochs"):
        if key in cfg and (not chosen or not chosen[0].startswith(key)):
            skip(key, f"{cfg[key]}: " + ("unset or 0" if not cfg[key] else
                                         f"{chosen[0]} decides the warm-up" if chosen else "no trainer.max_epochs"))


def _precision(src, value, cuda, put, skip) -> None:
    v = str(value)
    if not cuda:
        skip(src, f"{v}: float32 on CPU")
    elif "bf16" in v:
        put(src, "bf16", True)
    elif v.startswith("16"):
        put(src, "fp16", True)
    else:
        skip(src, f"{v}: float32")
