"""The command line: config files with overrides, the seeds' spellings, outputs a user relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vltune.args import ModelArguments, SFTDataArguments, SFTTrainingArguments, TunerArguments, parse_args
from vltune.errors import UsageError

GROUPS = (ModelArguments, TunerArguments, SFTDataArguments, SFTTrainingArguments)


def test_config_file_with_command_line_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_type: full\nlora_rank: 4\nlearning_rate: 0.002\nnum_train_epochs: 2\n"
                   "dataset: [a.jsonl, b.jsonl]\n")
    model, tuner, data, args = parse_args(GROUPS, ["--config", str(cfg), "--learning_rate", "3e-4",
                                                    "--output_dir", str(tmp_path)])
    assert tuner.train_type == "full" and tuner.lora_rank == 4
    assert args.learning_rate == 3e-4 and args.num_train_epochs == 2
    assert data.dataset == ["a.jsonl", "b.jsonl"]


def test_seed_spellings_are_accepted(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"tuner_type": "lora", "lora_r": 16, "use_wandb": True, "num_epochs": 3}))
    model, tuner, data, args = parse_args(GROUPS, ["--config", str(cfg), "--use_flash_attention", "--device", "auto",
                                                    "--output_dir", str(tmp_path)])
    assert tuner.train_type == "lora" and tuner.lora_rank == 16 and args.num_train_epochs == 3
    assert model.attn_impl == "flash_attention_2" and args.report_to == ["wandb"]
    _, tuner, _, _ = parse_args(GROUPS, ["--tuner_type", "qlora", "--output_dir", str(tmp_path)])
    assert tuner.train_type == "qlora"


def test_unknown_config_key_is_an_error(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"lora_rnak": 8}))
    with pytest.raises(UsageError, match="lora_rnak"):
        parse_args(GROUPS, ["--config", str(cfg)])


def test_grpo_has_no_sft_data_flags_and_reads_an_old_args_json_that_lists_them(tmp_path, capsys):
    """grpo samples its own completions: --packing, --loss_scale, ... are SFT flags, not in its --help or its
    parser. An args.json written before they were SFT-only lists them at their defaults and still loads; a value
    that grpo would silently ignore is refused, naming the key."""
    from vltune.train.grpo_config import ARG_GROUPS as GRPO_GROUPS

    sft_only = {"loss_scale", "train_separator", "packing", "packing_length", "padding_free"}
    with pytest.raises(SystemExit):
        parse_args(GRPO_GROUPS, ["--help"], prog="vltune grpo")
    grpo_help = capsys.readouterr().out
    assert "--max_length" in grpo_help and not any(f"--{k}" in grpo_help for k in sft_only)
    with pytest.raises(SystemExit):
        parse_args(GROUPS, ["--help"], prog="vltune sft")
    sft_help = capsys.readouterr().out
    assert all(f"--{k}" in sft_help for k in sft_only)
    with pytest.raises(UsageError, match=r"unrecognised arguments: --packing true; --packing: data flags of vltune "
                                         r"sft and personalize, which vltune grpo does not use \(all arguments"):
        parse_args(GRPO_GROUPS, ["--packing", "true", "--output_dir", str(tmp_path)], prog="vltune grpo")

    old = {"dataset": ["p.jsonl"], "max_length": 512, "loss_scale": "default", "train_separator": False,
           "packing": False, "packing_length": None, "padding_free": False}
    cfg = tmp_path / "args.json"
    cfg.write_text(json.dumps(old))
    data = next(g for g in parse_args(GRPO_GROUPS, ["--config", str(cfg), "--output_dir", str(tmp_path)])
                if hasattr(g, "dataset"))
    assert data.dataset == ["p.jsonl"] and data.max_length == 512 and not hasattr(data, "packing")
    cfg.write_text(json.dumps({**old, "packing": True}))
    with pytest.raises(UsageError, match=r"args.json sets packing: True, a data setting of vltune sft that "
                                         r"vltune grpo does not use"):
        parse_args(GRPO_GROUPS, ["--config", str(cfg), "--output_dir", str(tmp_path)], prog="vltune grpo")
    cfg.write_text(json.dumps({"packign": False}))  # a misspelt key is still an unknown key
    with pytest.raises(UsageError, match="unknown key.*packign"):
        parse_args(GRPO_GROUPS, ["--config", str(cfg)], prog="vltune grpo")


def test_precision_follows_the_hardware(tmp_path):
    import torch

    _, _, _, args = parse_args(GROUPS, ["--output_dir", str(tmp_path)])
    if not torch.cuda.is_available():
        assert not args.bf16 and not args.fp16 and args.use_cpu


@pytest.mark.parametrize("name", ["gui_agent_global_lora.yaml", "gui_agent_global_full.yaml", "quickstart_lora.json"])
def test_example_configs_parse(name, tmp_path):
    path = Path(__file__).parents[2] / "examples" / name
    model, tuner, data, args = parse_args(GROUPS, ["--config", str(path), "--output_dir", str(tmp_path)])
    assert tuner.train_type in ("lora", "full")
    if "gui_agent" in name:
        assert data.users == "11-83" and model.max_pixels == 1280 * 28 * 28 and args.gradient_accumulation_steps == 8


def test_personalize_example_config_parses(tmp_path):
    from vltune.recipes.personalize import PersonalizeArguments

    path = Path(__file__).parents[2] / "examples" / "gui_agent_personalize.yaml"
    model, tuner, data, args, p = parse_args((*GROUPS, PersonalizeArguments),
                                             ["--config", str(path), "--base", "g", "--output_dir", str(tmp_path)])
    assert tuner.train_type == "lora" and data.users == "1-10" and p.base == "g" and args.save_strategy == "no"


def test_repeated_list_flags_accumulate(tmp_path):
    """`--dataset a --dataset b` means both (argparse alone would keep only b); `--dataset a b` too."""
    _, _, data, _ = parse_args(GROUPS, ["--dataset", "a.jsonl", "--dataset", "b.jsonl", "--output_dir", str(tmp_path)])
    assert data.dataset == ["a.jsonl", "b.jsonl"]
    _, _, data, _ = parse_args(GROUPS, ["--dataset", "a.jsonl", "b.jsonl", "--output_dir", str(tmp_path)])
    assert data.dataset == ["a.jsonl", "b.jsonl"]


def test_renamed_flags_keep_their_old_spelling_with_a_one_line_notice(tmp_path, capsys):
    (_, tuner, _, _) = parse_args(GROUPS, ["--adapters", "out/a"])
    assert tuner.init_adapter == "out/a"
    assert capsys.readouterr().err.strip().splitlines() == [
        "vltune: --adapters is deprecated; use --init_adapter (same meaning)"]
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"adapters": "out/b"}))
    (_, tuner, _, _) = parse_args(GROUPS, ["--config", str(cfg)])
    assert tuner.init_adapter == "out/b" and "--adapters is deprecated" in capsys.readouterr().err
    (_, tuner, _, _) = parse_args(GROUPS, ["--init_adapter", "out/c"])
    assert tuner.init_adapter == "out/c" and capsys.readouterr().err == ""


def test_old_output_spelling_stays_an_output_dir_where_it_is_not_renamed(capsys):
    from vltune.recipes.infer import InferArguments

    (_, _, _, args) = parse_args(GROUPS, ["--output", "out/x"])
    assert args.output_dir == "out/x"
    (_, infer) = parse_args((ModelArguments, InferArguments), ["--output", "p.jsonl"], prog="vltune infer")
    assert infer.result_path == "p.jsonl"
    assert "vltune infer: --output is deprecated; use --result_path" in capsys.readouterr().err


def test_python_api_values_sit_between_config_file_and_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_rank: 4\nlearning_rate: 0.5\n")
    (_, tuner, _, args) = parse_args(GROUPS, ["--config", str(cfg), "--learning_rate", "0.25"],
                                     values={"lora_r": 16, "learning_rate": 0.125})
    assert tuner.lora_rank == 16 and args.learning_rate == 0.25
    with pytest.raises(UsageError, match="unknown argument name"):
        parse_args(GROUPS, [], values={"no_such_flag": 1})


@pytest.mark.parametrize("value", [None, "", "false", False, "true", True, "checkpoint-4"])
def test_resume_from_checkpoint_means_the_same_in_every_command(value, tmp_path):
    """unset/false: start fresh; true: the newest complete checkpoint-N of --output_dir; else that directory."""
    from vltune.checkpoints import mark_complete
    from vltune.train.run import resolve_resume

    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        mark_complete(str(tmp_path / f"checkpoint-{step}"), step)
    expected = None if value in (None, "", "false", False) else str(tmp_path / "checkpoint-4")
    given = str(tmp_path / value) if value == "checkpoint-4" else value
    assert resolve_resume(given, str(tmp_path)) == expected
