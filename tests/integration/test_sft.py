"""Tuners and the training engine: what trains, what stays frozen, what reloads, what resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vltune.args import ModelArguments, SFTDataArguments, SFTTrainingArguments, TunerArguments, parse_args
from vltune.models.families import part_of
from vltune.recipes.sft import main as sft_main

from tests.helpers import FAMILIES


def run(tmp, *extra, family="qwen3_vl", steps=4, dataset=None):
    argv = ["--model_family", family, "--output_dir", str(tmp), "--max_steps", str(steps), "--report_to", "none",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "no",
            "--gradient_checkpointing", "false", *extra]
    if dataset:
        argv += ["--dataset", dataset]
    return sft_main(argv)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().float() for n, p in model.named_parameters()}


def _base_name(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_only_lora_and_leaves_vision_bit_identical(family, tmp_path, tiny_path, grounding_jsonl):
    from transformers import AutoModelForImageTextToText

    before = snapshot(AutoModelForImageTextToText.from_pretrained(tiny_path(family)))
    result = run(tmp_path, "--train_type", "lora", "--learning_rate", "1e-2", family=family, dataset=grounding_jsonl)
    after = snapshot(result.model)
    changed_lora = [n for n in after if "lora_" in n and "lora_B" in n and after[n].abs().sum() > 0]
    assert changed_lora, "LoRA B matrices start at zero and must move"
    for name, value in after.items():
        if "lora_" in name:
            continue
        base = _base_name(name)
        assert torch.equal(value, before[base]), f"{name} changed but only LoRA should train"
        if part_of(name) in ("vision", "aligner"):
            assert not result.model.get_parameter(name).requires_grad
    assert not any(part_of(n) in ("vision", "aligner") for n in after if "lora_" in n), "no LoRA on frozen parts"
    out = Path(result.output_dir)
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_trains_llm_but_not_frozen_vision(family, tmp_path, tiny_path, grounding_jsonl):
    from transformers import AutoModelForImageTextToText

    before = snapshot(AutoModelForImageTextToText.from_pretrained(tiny_path(family)))
    result = run(tmp_path, "--train_type", "full", "--learning_rate", "1e-3", family=family, dataset=grounding_jsonl)
    after = snapshot(result.model)
    llm_changed = [n for n in after if part_of(n) == "llm" and not torch.equal(after[n], before[n])]
    assert len(llm_changed) > 10
    for n in after:
        if part_of(n) in ("vision", "aligner"):
            assert torch.equal(after[n], before[n]), f"frozen {n} changed"
    assert (Path(result.output_dir) / "model.safetensors").exists()


def test_unfreezing_vision_trains_it(tmp_path, grounding_jsonl, tiny_path):
    from transformers import AutoModelForImageTextToText

    before = snapshot(AutoModelForImageTextToText.from_pretrained(tiny_path("qwen3_vl")))
    result = run(tmp_path, "--train_type", "full", "--freeze_vit", "false", "--learning_rate", "1e-3",
                 dataset=grounding_jsonl)
    after = snapshot(result.model)
    assert any(part_of(n) == "vision" and not torch.equal(after[n], before[n]) for n in after)


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_trains_on_cpu_with_vision_unquantized(family, tmp_path, grounding_jsonl):
    pytest.importorskip("bitsandbytes")
    result = run(tmp_path, "--train_type", "qlora", "--learning_rate", "1e-2", family=family, dataset=grounding_jsonl)
    model = result.model
    linear4 = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert linear4, "the LLM must be quantised"
    assert not any(part_of(n) in ("vision", "aligner") for n in linear4), "vision tower must stay unquantised"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    assert (Path(result.output_dir) / "adapter_model.safetensors").exists()


def test_loss_falls_on_a_learnable_task(tmp_path, grounding_jsonl):
    result = run(tmp_path, "--train_type", "full", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant",
                 steps=30, dataset=grounding_jsonl)
    losses = [h["loss"] for h in result_state(result)["log_history"] if "loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses


def result_state(result) -> dict:
    return json.loads((Path(result.output_dir) / "trainer_state.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_saved_output_reloads_to_identical_logits(train_type, family, tmp_path, tiny_path, grounding_jsonl):
    from transformers import AutoModelForImageTextToText

    from vltune.data.dataset import SFTCollator, SFTDataset
    from vltune.data.formats import read_dataset
    from vltune.models.load import load_processor

    result = run(tmp_path, "--train_type", train_type, "--learning_rate", "1e-2", family=family,
                 dataset=grounding_jsonl)
    samples, _ = read_dataset(grounding_jsonl)
    processor = load_processor(result.output_dir)  # the processor is saved beside the weights
    batch = SFTCollator(processor)([SFTDataset(samples)[i] for i in range(2)])
    result.model.eval()
    with torch.no_grad():
        expected = result.model(**batch).logits
    if train_type == "lora":
        from peft import PeftModel

        base = AutoModelForImageTextToText.from_pretrained(tiny_path(family))
        reloaded = PeftModel.from_pretrained(base, result.output_dir)
    else:
        reloaded = AutoModelForImageTextToText.from_pretrained(result.output_dir)
    reloaded.eval()
    with torch.no_grad():
        got = reloaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_resume_continues_at_the_right_step_with_the_same_loss(tmp_path, grounding_jsonl):
    """Resume from the step-3 checkpoint of a 6-step run (what an interrupted run leaves behind) and compare
    steps 4-6 with the uninterrupted run. LoRA dropout makes the RNG state part of what must be restored.
    Each run is its own process, as a real resume is."""
    import subprocess
    import sys

    common = ["--train_type", "lora", "--learning_rate", "5e-3", "--save_strategy", "steps", "--save_steps", "3",
              "--lora_dropout", "0.1", "--seed", "7", "--max_steps", "6", "--report_to", "none",
              "--per_device_train_batch_size", "2", "--logging_steps", "1", "--gradient_checkpointing", "false",
              "--dataset", grounding_jsonl]

    def sft(*argv):
        proc = subprocess.run([sys.executable, "-m", "vltune", "sft", *common, *argv], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(out):
        state = json.loads((out / "trainer_state.json").read_text())
        return state["global_step"], {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}

    sft("--output_dir", str(tmp_path / "full"))
    sft("--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-3"))
    _, full = losses(tmp_path / "full")
    step, resumed = losses(tmp_path / "resumed")
    assert step == 6
    assert not (tmp_path / "resumed" / "checkpoint-3").exists(), "steps 1-3 must not be trained again"
    for k in (4, 5, 6):
        assert resumed[k] == pytest.approx(full[k], rel=1e-5), (k, resumed, full)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_to_keep_gives_the_same_loss_and_gradients(family, tiny_path, processor_for, grounding_jsonl):
    """The speed-up (logits only from the first trained position on, left padding) must not change the numbers."""
    from transformers import AutoModelForImageTextToText

    from vltune.data.dataset import SFTCollator, SFTDataset
    from vltune.data.formats import read_dataset
    from vltune.train.sft import accepts_logits_to_keep

    model = AutoModelForImageTextToText.from_pretrained(tiny_path(family))
    assert accepts_logits_to_keep(model)
    samples, _ = read_dataset(grounding_jsonl)
    items = [SFTDataset(samples)[i] for i in range(3)]
    items[1]["sample"].messages[0]["content"][-1]["text"] += " (a longer instruction, so the batch has padding)"
    results = []
    for keep in (False, True):
        batch = SFTCollator(processor_for(family), logits_to_keep=keep)(items)
        assert ("logits_to_keep" in batch) == keep
        padded = batch["attention_mask"] == 0
        assert padded.any() and padded[:, 0 if keep else -1].any(), "left padding with logits_to_keep, else right"
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), model.lm_head.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)


def test_sft_runs_offline_with_defaults_and_writes_everything(tmp_path):
    """`vltune sft --train_type lora --max_steps 5` as a user types it: tiny model + demo data."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "vltune", "sft", "--train_type", "lora", "--max_steps", "5",
                           "--output_dir", str(out), "--save_steps", "5", "--logging_steps", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("adapter_model.safetensors", "adapter_config.json", "args.json", "train.log", "loss.png",
                 "trainer_state.json", "data_report.json", "README.md", "checkpoint-5", "chat_template.jinja"):
        assert (out / name).exists(), name
    assert list((out / "runs").rglob("events.out.tfevents.*")), "TensorBoard events by default"
    log = (out / "train.log").read_text()
    assert "trainable parameters by part" in log and "[preflight]" in log and "'loss'" in log
    saved = json.loads((out / "args.json").read_text())
    assert saved["train_type"] == "lora" and saved["max_steps"] == 5
    # the saved arguments are a valid --config for the next run
    parse_args((ModelArguments, TunerArguments, SFTDataArguments, SFTTrainingArguments),
               ["--config", str(out / "args.json"), "--output_dir", str(tmp_path / "again")])
