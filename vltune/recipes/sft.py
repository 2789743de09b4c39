"""vltune sft: supervised fine-tuning of a vision-language model.

    vltune sft --model Qwen/Qwen3-VL-8B-Instruct --dataset data.jsonl --train_type lora --output_dir out
    vltune sft --config examples/gui_agent_global_lora.yaml --learning_rate 2e-5
    torchrun --nproc_per_node 2 -m vltune sft ...            # DDP (accelerate launch works too)
    vltune sft --train_type lora --max_steps 5               # offline: embedded tiny model + demo data

Top to bottom: arguments -> `vltune.train.sft.run_sft` (run directory -> processor -> data, validated and
never truncated -> model + tuner -> gradient-flow preflight -> HF Trainer -> adapter/weights, processor, logs
and plots).
"""

from __future__ import annotations

from ..args import ModelArguments, SFTDataArguments, SFTTrainingArguments, TunerArguments, parse_args
from ..train.sft import SFTResult, run_sft

ARG_GROUPS = (ModelArguments, TunerArguments, SFTDataArguments, SFTTrainingArguments)


def main(argv: list[str] | None = None) -> SFTResult:
    model_args, tuner, data, args = parse_args(ARG_GROUPS, argv, prog="vltune sft", description=__doc__)
    return run_sft(model_args, tuner, data, args)
