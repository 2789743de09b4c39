"""Typed configuration of the models layer: which model to load and how (ModelArguments), and how to tune it
(TunerArguments). Plain dataclasses: the CLI (vltune/args.py) fills them from flags and config files;
library code and tests build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BaseModelArguments:
    """Every model field but trust_remote_code: for commands whose trainer config has that flag already (TRL's
    GRPOConfig), so one flag fills both."""

    model: str | None = field(default=None, metadata={
        "help": "Hub id or local directory of the model to fine-tune (loaded with from_pretrained). "
                "Default: the embedded tiny model of --model_family, built locally (offline)."})
    model_family: str = field(default="qwen3_vl", metadata={
        "help": "Family of the embedded tiny model used when --model is not given: qwen3_vl, qwen2_5_vl, qwen2_vl, "
                "idefics3. With --model, the family is read from the checkpoint's config."})
    tiny_size: str = field(default="xs", metadata={
        "help": "Size of the embedded tiny model: xs (~0.3 M params, tests) or s (~2.5 M params, demo)."})
    torch_dtype: str = field(default="auto", metadata={
        "help": "auto | bfloat16 | float16 | float32. auto = bfloat16 on a GPU that supports it, float16 on older "
                "GPUs, float32 on CPU and Apple MPS."})
    attn_impl: str | None = field(default=None, metadata={
        "help": "Attention kernel: sdpa | eager | flash_attention_2 | flash_attention_3. Default: transformers' "
                "choice (sdpa). flash_attention_2 is faster on long sequences and needs the flash-attn package."})
    device: str = field(default="auto", metadata={
        "help": "auto | cpu | cuda | mps. auto = cuda if available, else mps, else cpu."})
    max_pixels: int | None = field(default=None, metadata={
        "help": "Upper bound on pixels per image after resizing (the main memory knob for VLMs; e.g. 1003520 = "
                "1280*28*28). Keep it equal at training and inference, or clicks drift."})
    min_pixels: int | None = field(default=None, metadata={"help": "Lower bound on pixels per image."})


@dataclass
class ModelArguments(BaseModelArguments):
    """Which model to load and how."""

    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the checkpoint."})


@dataclass
class TunerArguments:
    renamed_flags = {"adapters": "init_adapter"}  # old spelling -> name (vltune/args.py prints a notice)

    train_type: str = field(default="lora", metadata={"choices": ["lora", "qlora", "full"],
        "help": "lora | qlora | full. lora: low-rank adapters on frozen weights (least memory per quality); "
                "qlora: lora on a 4-bit (bitsandbytes nf4) base, least memory, slower; full: every unfrozen weight."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r: higher = more capacity and memory."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha/r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={
        "help": "Modules that get LoRA: all-linear (every linear layer of the unfrozen parts, lm_head excluded), "
                "module names (q_proj v_proj ...), or one regular expression matched against full module names."})
    freeze_vit: bool = field(default=True, metadata={"help": "Freeze the vision tower (no LoRA on it either)."})
    freeze_aligner: bool = field(default=True, metadata={
        "help": "Freeze the projector/merger between vision tower and LLM."})
    freeze_llm: bool = field(default=False, metadata={"help": "Freeze the language model."})
    quant_bits: int = field(default=4, metadata={"help": "Bits of the quantised base for qlora (4)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 | fp4 for qlora."})
    init_adapter: str | None = field(default=None, metadata={
        "help": "An existing PEFT adapter directory to continue training from (LoRA only; the adapter's weights, "
                "not the optimizer state: that is --resume_from_checkpoint). Was --adapters, which elsewhere "
                "names the adapter to apply."})
