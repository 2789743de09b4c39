"""vltune vla: train a vision-language-action policy the RoboVLMs way (VLM backbone + action head).

    vltune vla --dataset data/task_D_D --model Qwen/Qwen2.5-VL-3B-Instruct --action_head lstm \\
        --window_size 8 --fwd_pred_next_n 10 --train_type lora --output_dir out/calvin
    vltune vla --config finetune_kosmos_cont-lstm-post_full-ft_text_vision_wd-0_ws-8_act-10.json   # RoboVLMs JSON
    vltune vla --dataset data/mw --max_steps 3000 --train_seconds 1200 --output_dir out/mw       # Meta-World demos
    vltune vla --max_steps 20                 # offline: embedded tiny VLM + a synthetic reaching set

Top to bottom: arguments (a RoboVLMs JSON is mapped key by key) -> episodes (CALVIN / LeRobot v3) ->
backbone + tuner (lora | full | frozen) -> policy config, checked normalisation statistics -> policy ->
gradient-flow preflight -> HF Trainer (AdamW, cosine to min_lr_scale, clipping, best-k checkpoints on
validation loss, TensorBoard + CSV logs) -> policy_config.json + normalization.json + policy.safetensors,
loadable with `Policy.from_pretrained(output_dir)`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..args import parse_args
from ..console import setup_logging
from ..data.splits import split_holdout
from ..errors import UsageError
from ..models.config import ModelArguments, TunerArguments
from ..models.tuners import apply_tuner, enable_gradient_checkpointing, format_summary, parameter_summary
from ..train.run import log_preflight, open_run, resolve_resume, write_model_card
from ..train.vla_config import ARG_GROUPS, PolicyArguments, VLADataArguments, VLATrainingArguments
from ..train.survive import WithSampleIds, train as train_surviving
from ..train.vla_trainer import CSVLog, PolicyTrainer, TimeBudget, TopKCheckpoints, eval_loader
from ..vla.config import PolicyConfig, parse_index_list
from ..vla.data.episodes import Episode
from ..vla.normalize import Normalizer, compute_stats

logger = logging.getLogger("vltune")




@dataclass
class VLAResult:
    output_dir: str
    metrics: dict
    model: torch.nn.Module
    config: PolicyConfig


# ---------------------------------------------------------------------------- RoboVLMs JSON
@contextmanager
def robovlms_argv(argv: list[str]):
    """If --config names a RoboVLMs JSON, map it onto our keys (logged) and yield argv with --config pointing
    at the mapped file, a temporary one that is deleted on exit; otherwise yield argv unchanged."""
    from ..vla.robovlms_config import is_robovlms_config, load_with_parents, map_robovlms

    i = next((k for k, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), None)
    path = None if i is None else argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1] if i + 1 < len(argv) else None
    if path is None or not path.endswith(".json") or not Path(path).is_file() or \
            not is_robovlms_config(json.loads(Path(path).read_text(encoding="utf-8"))):
        yield argv
        return
    ours, mapped, ignored = map_robovlms(load_with_parents(path), cuda=torch.cuda.is_available())
    logger.info("[config] %s is a RoboVLMs config; mapped:\n  %s", path, "\n  ".join(mapped))
    if ignored:
        logger.info("[config] ignored RoboVLMs keys:\n  %s", "\n  ".join(ignored))
    for line in ignored:
        if "dropped, because" in line:
            logger.warning("[config] %s", line)
    fd, tmp = tempfile.mkstemp(prefix="vltune_robovlms_", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(ours, f)
        yield ["--config", tmp] + argv[:i] + argv[i + (1 if "=" in argv[i] else 2):]
    finally:
        os.unlink(tmp)


@contextmanager
def tensorboard_dir(logging_dir: str | None):
    """--logging_dir: transformers 5 reads the TensorBoard directory from TENSORBOARD_LOGGING_DIR (restored after)."""
    if not logging_dir:
        yield
        return
    before = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(logging_dir))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = before


# ---------------------------------------------------------------------------- data
def load_episodes(data: VLADataArguments, out: Path, seed: int) -> tuple[list[Episode], list[Episode], str]:
    """(training episodes, validation episodes, where they came from)."""
    from ..vla.data import detect_format, read_episodes

    spec = data.dataset
    if not spec:
        from ..vla.data.synthetic import make_dataset

        spec = make_dataset(str(out / "synthetic_data"), fmt="calvin", n_train=32, n_val=4)
        logger.info("[data] no --dataset given: using a synthetic reaching set (%s)", spec)
    fmt = detect_format(spec) if data.data_format == "auto" else data.data_format
    kw = {"action_key": data.action_key} if fmt == "calvin" else {}
    train = read_episodes(spec, fmt, split=data.train_split, max_episodes=data.max_episodes, **kw)
    val: list[Episode] = []
    has_val = (Path(spec) / data.val_split).is_dir() and data.val_split != data.train_split
    if has_val:
        val = read_episodes(spec, fmt, split=data.val_split, **kw)
    elif data.val_episodes_ratio > 0 and len(train) > 1:
        train, val = split_holdout(train, data.val_episodes_ratio, seed)
    frames = sum(map(len, train))
    logger.info("[data] %s (%s): %d training episodes (%d frames), %d validation episodes; action dim %d, state %s, "
                "cameras %s", spec, fmt, len(train), frames, len(val), train[0].actions.shape[1],
                None if train[0].state is None else train[0].state.shape[1], sorted(train[0].images))
    return train, val, spec


def select_cameras(policy_args: PolicyArguments, available: list[str], source: str) -> list[str]:
    """--cameras -> the camera names the policy reads, each checked against the data's."""
    if policy_args.cameras == "auto":
        if "static" in available:
            return ["static"] + (["gripper"] if policy_args.use_gripper_camera and "gripper" in available else [])
        cameras = available
    else:
        cameras = [c.strip() for c in policy_args.cameras.split(",") if c.strip()]
        missing = [c for c in cameras if c not in available]
        if missing or len(set(cameras)) != len(cameras):
            raise UsageError(f"--cameras {policy_args.cameras}: {source} has cameras {', '.join(available) or 'none'}"
                             f"{'; ' + ', '.join(missing) + ' not among them' if missing else '; a camera is repeated'}"
                             f"; pick from those (or --cameras auto)")
    if policy_args.use_images and not cameras:
        raise UsageError(f"--dataset {source}: no camera images (rgb_* / observation.images.*); train with "
                         "--use_images false for a state-only policy")
    return cameras


def resolve_gripper_dims(value: str, episodes: list[Episode]) -> tuple[list[int], list[list[float]]]:
    a_dim = episodes[0].actions.shape[1]
    actions = np.concatenate([e.actions for e in episodes])
    dims = parse_index_list(value, "--gripper_dims", a_dim)
    if dims is None:  # auto: the last dimension if it takes exactly two values
        dims = [a_dim - 1] if a_dim > 1 and len(np.unique(actions[:, -1])) == 2 else []
        logger.info("[policy] --gripper_dims auto -> %s", dims or "none")
    values = []
    for d in dims:
        low, high = float(actions[:, d].min()), float(actions[:, d].max())
        if low == high:
            raise ValueError(f"gripper dimension {d} is constant ({low}) in the training data: nothing to learn; "
                             "drop it from --gripper_dims")
        values.append([low, high])
    return dims, values


def resolve_constant_dims(episodes: list[Episode], gripper_dims: list[int]) -> tuple[list[int], list[float]]:
    """Action dimensions with one value in every training frame (e.g. the gripper of tasks that never grasp):
    left out of the loss and output as that value, instead of stopping the run (normalising them would divide
    by zero)."""
    actions = np.concatenate([e.actions for e in episodes])
    dims = [d for d in range(actions.shape[1]) if d not in gripper_dims and actions[:, d].min() == actions[:, d].max()]
    values = [float(actions[0, d]) for d in dims]
    if len(dims) == actions.shape[1]:
        raise ValueError("every action dimension is constant in the training data: there is nothing to learn; "
                         "check --action_key and the data")
    if dims:
        logger.warning("[policy] action dimension(s) %s never vary in the training data (%s): kept constant (left "
                       "out of the loss, output as that value)", dims,
                       ", ".join(f"dim {d} = {v:g}" for d, v in zip(dims, values)))
    return dims, values


def build_normalizers(config: PolicyConfig, data: VLADataArguments, episodes: list[Episode]) -> dict[str, Normalizer]:
    sources = [e.source for e in episodes]
    norms = {"action": Normalizer("action", data.norm_action, compute_stats([e.actions for e in episodes], "action",
                                                                            sources), dims=config.arm_dims,
                                  norm_min=data.norm_min, norm_max=data.norm_max)}
    if config.state_dim:
        states = [e.state[:, config.state_indices] for e in episodes]
        norms["state"] = Normalizer("state", data.norm_state, compute_stats(states, "state", sources),
                                    dims=list(range(config.state_dim)))
    return norms


# ---------------------------------------------------------------------------- model
def build_backbone(model_args: ModelArguments, tuner: TunerArguments, args: VLATrainingArguments):
    from ..models.load import load_model, load_processor, resolve_model_path

    path = resolve_model_path(model_args)
    spec = model_args.model or f"tiny:{model_args.model_family}:{model_args.tiny_size}"
    if tuner.train_type not in ("lora", "full", "frozen"):
        raise ValueError(f"--train_type must be lora, full or frozen for vltune vla, got {tuner.train_type!r}")
    vlm = load_model(path, model_args, "full")
    lora: dict = {}
    if tuner.train_type == "frozen":
        vlm.requires_grad_(False)
    else:
        vlm = apply_tuner(vlm, tuner)
        if tuner.train_type == "lora":
            pc = vlm.peft_config["default"]
            lora = {"r": pc.r, "alpha": pc.lora_alpha, "dropout": pc.lora_dropout,
                    "target_modules": sorted(pc.target_modules)}
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(vlm, args.gradient_checkpointing_kwargs)
    return vlm, load_processor(path, model_args.max_pixels, model_args.min_pixels), spec, lora


# ---------------------------------------------------------------------------- recipe
def run_vla(model_args, tuner, policy_args: PolicyArguments, data: VLADataArguments, args: VLATrainingArguments,
            callbacks: list | None = None) -> VLAResult:
    from ..vla.dataset import WindowCollator, WindowDataset
    from ..vla.frames import FrameInputs
    from ..vla.modeling import PolicyModel, image_token_id

    with open_run(args.output_dir, (model_args, tuner, policy_args, data, args), args.seed) as out, \
            tensorboard_dir(args.logging_dir):
        train_eps, val_eps, source = load_episodes(data, out, args.seed)

        if not policy_args.use_images and not (tuner.freeze_vit and tuner.freeze_aligner):
            logger.info("[policy] --use_images false: freezing the vision tower and aligner (they never run)")
            tuner.freeze_vit = tuner.freeze_aligner = True
        vlm, processor, spec, lora = build_backbone(model_args, tuner, args)
        gripper_dims, gripper_values = resolve_gripper_dims(policy_args.gripper_dims, train_eps)
        constant_dims, constant_values = resolve_constant_dims(train_eps, gripper_dims)
        s_dim = 0 if train_eps[0].state is None or not policy_args.use_state else train_eps[0].state.shape[1]
        state_idx = (parse_index_list(policy_args.state_dims, "--state_dims", s_dim) if s_dim else None)
        state_idx = list(range(s_dim)) if state_idx is None else state_idx
        cameras = select_cameras(policy_args, list(train_eps[0].images), source)
        config = PolicyConfig(
            backbone=spec, train_type=tuner.train_type, lora=lora, action_head=policy_args.action_head,
            head_hidden=policy_args.head_hidden, head_layers=policy_args.head_layers,
            window_size=policy_args.window_size, fwd_pred_next_n=policy_args.fwd_pred_next_n,
            exec_steps=policy_args.exec_steps, action_dim=int(train_eps[0].actions.shape[1]),
            gripper_dims=gripper_dims, gripper_values=gripper_values, state_dim=len(state_idx),
            state_indices=state_idx, cameras=cameras, image_size=policy_args.image_size,
            use_images=policy_args.use_images, arm_loss=policy_args.arm_loss,
            arm_gripper_loss_ratio=policy_args.arm_gripper_loss_ratio, readout=policy_args.readout,
            head_input_norm=policy_args.head_input_norm, constant_dims=constant_dims, constant_values=constant_values)
        normalizers = build_normalizers(config, data, train_eps)
        frames = FrameInputs(processor, config)
        if config.use_images and config.readout == "action+image":
            config.image_tokens = frames.ids("")[0].count(image_token_id(vlm))
        model = PolicyModel(config, vlm).to(args.device)
        logger.info("[policy] %s head, window %d, chunk %d, action dim %d (gripper dims %s), state dims %s, "
                    "cameras %s at %d px (%s), read-out %s, backbone %s (%s)", config.action_head, config.window_size,
                    config.fwd_pred_next_n, config.action_dim, config.gripper_dims or "none", config.state_dim,
                    cameras if config.use_images else "none (no-image ablation)", frames.size,
                    "torch patchify" if frames.fast else "processor",
                    config.readout + (f" ({config.image_tokens} image tokens)" if config.image_tokens else ""),
                    spec, tuner.train_type)
        logger.info("[model] trainable parameters by part:\n%s", format_summary(parameter_summary(model)))

        train_ds = WindowDataset(train_eps, config, normalizers)
        eval_ds = WindowDataset(val_eps, config, normalizers) if val_eps else None
        collator = WindowCollator(frames, config, policy_args.image_aug_shift, seed=args.seed)
        eval_collator = WindowCollator(frames, config, 0)

        batch = collator([train_ds[i] for i in range(0, len(train_ds), max(1, len(train_ds) // 8))][:8])
        log_preflight(model, batch, args.device, loss_fn=lambda m, b: m(**b)["loss"])

        args.label_names = ["actions"]
        args.prediction_loss_only = True
        args.save_total_limit = None  # TopKCheckpoints decides what stays
        if args.lr_scheduler_type == "cosine_with_min_lr":
            args.lr_scheduler_kwargs = {**(args.lr_scheduler_kwargs or {}), "min_lr_rate": args.min_lr_scale}
        if eval_ds is not None and args.eval_strategy == "no":
            args.eval_strategy = args.save_strategy
            args.eval_steps = args.eval_steps or args.save_steps
        # Checkpointing is already on the backbone (build_backbone); the policy wrapper has no such method.
        args.gradient_checkpointing = False
        if hasattr(args, "activation_checkpointing"):  # transformers >= 5.2x spelling of the same switch
            args.activation_checkpointing = False
        cbs = [TopKCheckpoints(str(out), args.save_top_k), CSVLog(out / "metrics.csv"), *(callbacks or [])]
        if args.train_seconds:
            cbs.append(TimeBudget(args.train_seconds))
        trainer = PolicyTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                data_collator=WithSampleIds(collator), callbacks=cbs)
        trainer.normalizers = normalizers
        if eval_ds is not None:
            trainer.get_eval_dataloader = eval_loader(trainer, eval_ds, eval_collator)
        t0 = time.time()
        result = train_surviving(trainer, resolve_resume(args.resume_from_checkpoint, args.output_dir), args)
        metrics = dict(result.metrics)
        metrics["train_wall_seconds"] = round(time.time() - t0, 1)
        if constant_dims:
            metrics["constant_action_dims"] = dict(zip(map(str, constant_dims), constant_values))
        if eval_ds is not None:
            metrics.update(trainer.evaluate())
        model.save_pretrained(out, normalizers)
        if trainer.is_world_process_zero():
            trainer.save_state()
            _write_outputs(out, trainer, metrics, config, source)
        return VLAResult(str(out), metrics, model, config)


def _write_outputs(out: Path, trainer, metrics: dict, config: PolicyConfig, source: str) -> None:
    from ..eval.plots import plot_loss_curve

    (out / "train_results.json").write_text(json.dumps(metrics, indent=2, default=str))
    png = plot_loss_curve(trainer.state.log_history, out / "loss.png")
    best = out / "best_checkpoints.json"
    write_model_card(
        out, "vltune vla policy",
        [f"backbone: `{config.backbone}` ({config.train_type})", f"data: `{source}`",
         f"head: {config.action_head}, window {config.window_size}, chunk {config.fwd_pred_next_n}, action dim "
         f"{config.action_dim}, gripper dims {config.gripper_dims or 'none'}"
         + (f", constant dims {dict(zip(config.constant_dims, config.constant_values))} (never vary in the data: "
            "output as that value, not trained)" if config.constant_dims else ""),
         f"steps: {trainer.state.global_step}, final train loss {metrics.get('train_loss')}, eval loss "
         f"{metrics.get('eval_loss')}"],
        "```python\nfrom vltune.vla.policy import Policy\n"
        f"policy = Policy.from_pretrained('{out}')\npolicy.reset()\naction = policy.step(images, instruction, state)\n"
        "```\n\n",
        "policy_config.json, normalization.json, policy.safetensors, args.json, train.log, "
        f"metrics.csv, train_results.json, runs/ (TensorBoard){', loss.png' if png else ''}"
        f"{', best_checkpoints.json + checkpoint-N/ (best k on validation loss)' if best.exists() else ''}",
        command="vla", library="vltune", base_model=config.backbone)


def main(argv: list[str] | None = None) -> VLAResult:
    setup_logging()
    with robovlms_argv(list(sys.argv[1:] if argv is None else argv)) as argv:
        model_args, tuner, policy_args, data, args = parse_args(ARG_GROUPS, argv, prog="vltune vla",
                                                                description=__doc__)
    return run_vla(model_args, tuner, policy_args, data, args)
