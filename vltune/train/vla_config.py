"""Arguments of `vltune vla`, split by concern (backbone, tuner, policy head, data, training).

Model and tuner arguments are the SFT ones (vltune/models/config.py: --model, --model_family, --tiny_size,
--train_type, --lora_rank, --freeze_vit ...) with policy defaults; `--train_type` also takes `frozen` here
(backbone fixed, only the head and state encoder train).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..args import RunSafetyArguments, default_output_dir
from ..models.config import ModelArguments, TunerArguments


@dataclass
class VLAModelArguments(ModelArguments):
    tiny_size: str = field(default="s", metadata={
        "help": "Size of the embedded tiny backbone: s (~2.5 M params, vision tower pretrained at build time; "
                "default for policies) or xs (~0.3 M, tests)."})


@dataclass
class VLATunerArguments(TunerArguments):
    train_type: str = field(default="full", metadata={"choices": ["lora", "full", "frozen"],
        "help": "lora | full | frozen. full: train the backbone (RoboVLMs' full-ft); lora: adapters on the "
                "unfrozen parts; frozen: backbone fixed, only the head (+ state encoder) trains. The head always "
                "trains."})
    freeze_vit: bool = field(default=False, metadata={
        "help": "Freeze the vision tower (RoboVLMs: train_vision false). Policies usually need it trained."})
    freeze_aligner: bool = field(default=False, metadata={"help": "Freeze the projector between vision and LLM."})


@dataclass
class PolicyArguments:
    action_head: str = field(default="lstm", metadata={
        "choices": ["lstm", "mlp", "gpt", "LSTMDecoder", "FCDecoder", "GPTDecoder"],
        "help": "Action head: lstm (RoboVLMs' default, recurrent over the window), mlp (per frame, cheapest), "
                "gpt (causal transformer over the window). RoboVLMs names LSTMDecoder/FCDecoder/GPTDecoder work."})
    head_hidden: int = field(default=256, metadata={"help": "Hidden size of the action head."})
    head_layers: int = field(default=2, metadata={"help": "LSTM / transformer layers of the head."})
    window_size: int = field(default=2, metadata={
        "help": "History window: frames the policy sees per decision (RoboVLMs: 8). Each frame is one backbone "
                "forward, so compute grows linearly with it."})
    fwd_pred_next_n: int = field(default=4, metadata={
        "help": "Action chunk: future actions predicted per step (RoboVLMs: 10). At inference the policy "
                "re-plans every --exec_steps steps from the latest chunk."})
    exec_steps: int = field(default=1, metadata={
        "help": "Actions executed from one predicted chunk before predicting again (1 = re-plan every step; "
                "larger = fewer head calls, for real-time control)."})
    gripper_dims: str = field(default="auto", metadata={
        "help": "Action dimensions that are gripper open/close commands (trained with BCE, output as the data's "
                "low/high value): comma-separated indices ('6', '6,13' bimanual), 'none', or auto = the last "
                "dimension if it only takes two values in the data, else none."})
    use_state: bool = field(default=True, metadata={
        "help": "Feed proprioceptive state (robot_obs / observation.state) to the head when the data has it."})
    state_dims: str = field(default="all", metadata={
        "help": "Which state dimensions to use: 'all' or comma-separated indices (e.g. '0,1,2,3')."})
    use_images: bool = field(default=True, metadata={
        "help": "Give the backbone the camera images. false = the no-image ablation (instruction + state only)."})
    cameras: str = field(default="auto", metadata={
        "help": "Cameras the policy reads per frame, comma-separated names as in the data (Meta-World demos: "
                "topview,corner,gripperPOV; a LeRobot dataset's observation.images.<name>; CALVIN: static,gripper). "
                "auto = static (+ gripper, see --use_gripper_camera) when the data has CALVIN's static camera, else "
                "every camera in the data. Each camera is one more image per frame."})
    use_gripper_camera: bool = field(default=True, metadata={
        "help": "With --cameras auto: use the wrist/gripper camera too when the data has one."})
    readout: str = field(default="action", metadata={
        "help": "What the head reads from the backbone per frame: action = the last prompt token's hidden state "
                "(RoboVLMs' action token); action+image = that plus the final hidden states of every image token, "
                "flattened in raster order (keeps where things are; more head inputs)."})
    head_input_norm: str = field(default="batch", metadata={
        "help": "How the head normalises its per-frame input features: batch (per-feature statistics over the "
                "batch's frames, running ones at inference: removes each feature's constant offset, so small "
                "variations such as where an object is stand out; the README's Meta-World table compares the two) | "
                "layer (LayerNorm per frame)."})
    image_size: int = field(default=96, metadata={
        "help": "Images are resized to this square size before the backbone. For the Qwen-VL tiny models one "
                "image token covers 32x32 px, so 96 px = 9 tokens per image; more pixels = more tokens."})
    image_aug_shift: int = field(default=4, metadata={
        "help": "Random-shift augmentation at training (pixels, pad + random crop); 0 turns it off."})
    arm_loss: str = field(default="huber", metadata={"help": "Loss on the arm dimensions: huber | mse."})
    arm_gripper_loss_ratio: float = field(default=0.01, metadata={
        "help": "Weight of the gripper BCE against the arm loss (RoboVLMs: 0.01)."})


@dataclass
class VLADataArguments:
    dataset: str | None = field(default=None, metadata={
        "help": "Robot data: a CALVIN directory (task_*/ or its training/ split) or a LeRobotDataset v3 directory. "
                "Default: a small synthetic reaching set (offline)."})
    data_format: str = field(default="auto", metadata={"help": "auto | calvin | lerobot."})
    train_split: str = field(default="training", metadata={"help": "CALVIN split to train on."})
    val_split: str = field(default="validation", metadata={
        "help": "CALVIN split for validation loss (used when present)."})
    val_episodes_ratio: float = field(default=0.05, metadata={
        "help": "When the data has no validation split, hold out this fraction of episodes for validation loss."})
    action_key: str = field(default="rel_actions", metadata={"help": "CALVIN: which action array to train on."})
    max_episodes: int | None = field(default=None, metadata={"help": "Use only the first N episodes."})
    norm_action: str = field(default="minmax", metadata={
        "help": "Action normalisation of the arm dimensions: minmax (data min/max -> [-1, 1]), bounds "
                "(RoboVLMs: clip to [norm_min, norm_max] -> [-1, 1]), meanstd, none."})
    norm_min: float = field(default=-0.65, metadata={"help": "Lower bound for --norm_action bounds."})
    norm_max: float = field(default=0.65, metadata={"help": "Upper bound for --norm_action bounds."})
    norm_state: str = field(default="meanstd", metadata={"help": "State normalisation: meanstd | minmax | none."})


@dataclass
class VLATrainingArguments(RunSafetyArguments, TrainingArguments):
    """HF TrainingArguments with the Lightning-era behaviour RoboVLMs users rely on."""

    output_dir: str | None = field(default_factory=default_output_dir("vla"), metadata={"help": "Where to write everything."})
    learning_rate: float = field(default=1e-3, metadata={
        "help": "Peak learning rate (RoboVLMs: 2e-5 for a 3B backbone; tiny backbones and heads like ~1e-3)."})
    min_lr_scale: float = field(default=0.01, metadata={
        "help": "Cosine decay ends at learning_rate * min_lr_scale (RoboVLMs' min_lr_scale)."})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "Schedule (warm-up + cosine)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (Lightning gradient_clip_val)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training windows."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Windows per device per step."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Windows per device per eval step."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=500, metadata={"help": "Evaluate and save a checkpoint every N steps."})
    save_top_k: int = field(default=3, metadata={
        "help": "Keep the k checkpoints with the lowest validation loss (Lightning's ModelCheckpoint save_top_k); "
                "without validation data, the k most recent."})
    report_to: list[str] | None = field(default_factory=lambda: ["tensorboard"], metadata={
        "help": "tensorboard | wandb | none. A CSV log (metrics.csv) is always written."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep raw columns for the collator."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loading worker processes."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute backbone activations in backward (less memory, slower; non-reentrant)."})
    logging_dir: str | None = field(default=None, metadata={
        "help": "Where TensorBoard event files go (default: <output_dir>/runs/<date>). RoboVLMs' log_root maps "
                "here."})
    train_seconds: float | None = field(default=None, metadata={
        "help": "Stop training after this many seconds of wall time (a compute budget; the schedule still "
                "follows max_steps / epochs, so set those to match)."})


ARG_GROUPS = (VLAModelArguments, VLATunerArguments, PolicyArguments, VLADataArguments, VLATrainingArguments)
