"""Multi-process training on CPU (gloo): real data parallelism with torchrun, accelerate launch and DeepSpeed
ZeRO-2, checked through the per-rank dumps of `vltune.train.debug.DistributedDebugCallback`; the `--deepspeed`
presets; and `vltune export --deepspeed_to_fp32` on the ZeRO checkpoint such a run writes."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from vltune.args import ModelArguments, SFTDataArguments, SFTTrainingArguments, TunerArguments, parse_args
from vltune.distributed import DEEPSPEED_PRESETS, deepspeed_config, resolve_deepspeed
from vltune.errors import UsageError
from vltune.train.debug import DEBUG_DIST_ENV

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed "
                                     "(optional extra: pip install 'vltune[deepspeed]')")
GROUPS = (ModelArguments, TunerArguments, SFTDataArguments, SFTTrainingArguments)
STEPS = 4


# ---------------------------------------------------------------------------- --deepspeed presets
@needs_deepspeed  # transformers fills the "auto" values only with deepspeed installed
@pytest.mark.parametrize("preset", list(DEEPSPEED_PRESETS))
def test_presets_leave_every_training_value_to_the_command_line(preset):
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    config = deepspeed_config(preset)
    zero = config["zero_optimization"]
    assert zero["stage"] == (3 if preset.startswith("zero3") else 2)
    assert ("offload_optimizer" in zero) == preset.endswith("_offload")
    assert ("offload_param" in zero) == (preset == "zero3_offload")
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # else save_model() writes no weights
    # transformers fills the "auto" entries from TrainingArguments; nothing may be left "auto" or mismatch
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=3, gradient_accumulation_steps=4,
                             max_grad_norm=0.5, learning_rate=2e-5, weight_decay=0.1, use_cpu=True, report_to=[])
    # Building it sets transformers' module-level weak reference to the DeepSpeed config; without deepspeed
    # installed every later from_pretrained in this process would then fail in is_deepspeed_zero3_enabled().
    try:
        hf = HfTrainerDeepSpeedConfig(config)
        hf.trainer_config_process(args)
        filled = hf.config
        mismatches = list(hf.mismatches)
    finally:
        unset_hf_deepspeed_config()
    assert filled["train_micro_batch_size_per_gpu"] == 3 and filled["gradient_accumulation_steps"] == 4
    assert filled["train_batch_size"] == 3 * 4 * args.world_size and filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is False and filled["fp16"]["enabled"] is False
    if "optimizer" in filled:
        assert filled["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    assert not mismatches
    assert config["train_batch_size"] == "auto", "the builder must return a fresh dict each time"


def test_deepspeed_values(tmp_path, monkeypatch):
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    if HAS_DEEPSPEED:
        assert resolve_deepspeed("zero2")["zero_optimization"]["stage"] == 2
        assert resolve_deepspeed(str(own)) == str(own)  # a user's file passes through to transformers
    assert resolve_deepspeed(None) is None and resolve_deepspeed("none") is None
    with pytest.raises(UsageError, match="zero2, zero3, zero2_offload, zero3_offload"):
        resolve_deepspeed("zero5")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else object())
    with pytest.raises(UsageError, match=r"pip install 'vltune\[deepspeed\]'"):
        resolve_deepspeed("zero2")


@needs_deepspeed
def test_parse_args_turns_a_preset_into_a_config(tmp_path):
    *_, args = parse_args(GROUPS, ["--deepspeed", "zero3", "--output_dir", str(tmp_path)])
    assert isinstance(args.deepspeed, dict) and args.deepspeed["zero_optimization"]["stage"] == 3
    cfg = tmp_path / "c.yaml"
    cfg.write_text("use_deepspeed: true\n")  # the seeds' spelling -> zero2
    *_, args = parse_args(GROUPS, ["--config", str(cfg), "--output_dir", str(tmp_path)])
    assert args.deepspeed["zero_optimization"]["stage"] == 2
    *_, args = parse_args(GROUPS, ["--config", str(cfg), "--deepspeed=zero2_offload", "--output_dir", str(tmp_path)])
    assert args.deepspeed["zero_optimization"]["offload_optimizer"]["device"] == "cpu"  # command line wins


# ---------------------------------------------------------------------------- 2-process runs
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], out: Path, dataset: str, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run `<launcher> -m vltune sft` with 2 processes; return the process and the per-rank dumps."""
    dump = out / "ranks"
    env = {**os.environ, DEBUG_DIST_ENV: str(dump), "OMP_NUM_THREADS": "1"}  # 1 thread a rank: 2 ranks, 2 cores
    cmd = [*launcher, "-m", "vltune", "sft", "--dataset", dataset, "--output_dir", str(out),
           "--max_steps", str(STEPS), "--per_device_train_batch_size", "1", "--learning_rate", "1e-2",
           "--report_to", "none", "--logging_steps", "1", "--gradient_checkpointing", "false", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env)
    ranks = [json.loads(p.read_text()) for p in sorted(dump.glob("rank*.json"))] if dump.exists() else []
    return proc, ranks


def assert_data_parallel(proc, ranks: list[dict], out: Path, wrapper: str) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]  # torchrun: every rank exited 0
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["world_size"] == 2 and r["backend"] == "gloo" and r["wrapper"] == wrapper
        assert r["global_step"] == STEPS and len(r["batches"]) == STEPS
    # different shards: no batch seen by both ranks
    seen = [{b["fingerprint"] for b in r["batches"]} for r in ranks]
    assert len(seen[0]) == len(seen[1]) == STEPS and not seen[0] & seen[1]
    # one model: identical parameters on both ranks after training, and they did train
    assert ranks[0]["params_end"] == ranks[1]["params_end"]
    assert ranks[0]["params_all_end"] == ranks[1]["params_all_end"]
    assert any(ranks[0]["params_start"][k] != v for k, v in ranks[0]["params_end"].items())
    # each optimizer step consumed one sample per rank: 2 samples a step out of the 32
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["log_history"][-1]["epoch"] == pytest.approx(STEPS * 2 / 32)


@pytest.mark.multiprocess
def test_torchrun_two_processes_train_one_model_on_different_shards(tmp_path, tiny_path, grounding_jsonl):
    tiny_path("qwen3_vl")  # build the tiny model once, before two ranks race to build it
    proc, ranks = launch(["torchrun", "--standalone", "--nproc_per_node", "2"], tmp_path / "run", grounding_jsonl,
                         "--save_strategy", "no")
    assert_data_parallel(proc, ranks, tmp_path / "run", "DistributedDataParallel")
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.multiprocess
def test_accelerate_launch_two_processes(tmp_path, tiny_path, grounding_jsonl):
    tiny_path("qwen3_vl")
    # On a CPU-only machine accelerate needs --multi_gpu to start one process per rank through torch's
    # launcher; `--cpu --num_processes 2` alone would start a single process (multi-CPU there means mpirun).
    launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    proc, ranks = launch(launcher, tmp_path / "run", grounding_jsonl, "--save_strategy", "no")
    assert_data_parallel(proc, ranks, tmp_path / "run", "DistributedDataParallel")


@pytest.fixture(scope="module", params=["lora", "full"])
def zero2_run(request, tmp_path_factory, _tiny_cache):
    """A 2-rank ZeRO-2 run on CPU (LoRA, then full fine-tuning) that keeps its last ZeRO checkpoint."""
    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (optional extra: pip install 'vltune[deepspeed]')")
    from vltune.data.synthetic import make_grounding_set
    from vltune.models.tiny import tiny_model_path

    tiny_model_path("qwen3_vl", "xs")
    root = tmp_path_factory.mktemp(f"zero2_{request.param}")
    data = make_grounding_set(root / "data", n_train=32, n_test=4, seed=0)["train"]
    proc, ranks = launch(["torchrun", "--standalone", "--nproc_per_node", "2"], root / "run", data,
                         "--deepspeed", "zero2", "--train_type", request.param,
                         "--save_strategy", "steps", "--save_steps", str(STEPS))
    return request.param, proc, ranks, root / "run"


@pytest.mark.multiprocess
@needs_deepspeed
def test_deepspeed_zero2_on_cpu(zero2_run):
    """DeepSpeed's CPU accelerator runs ZeRO-2 over gloo. The first run on a machine also JIT-compiles
    DeepSpeed's shared-memory comm op (~80 s on 2 cores, then cached in ~/.cache/torch_extensions)."""
    _, proc, ranks, out = zero2_run
    assert_data_parallel(proc, ranks, out, "DeepSpeedEngine")
    assert (out / f"checkpoint-{STEPS}" / "latest").read_text().strip() == f"global_step{STEPS}"


@pytest.mark.multiprocess
@needs_deepspeed
def test_export_zero_checkpoint_to_fp32(zero2_run, tmp_path, tiny_path):
    """LoRA: the consolidated adapter equals the one the Trainer saved and loads with PeftModel.
    Full: the consolidated model loads with from_pretrained and equals the Trainer's saved weights."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from vltune.recipes.export import main as export_main

    train_type, proc, _, out = zero2_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / f"checkpoint-{STEPS}"
    # small shards for the full model (~1 MB), to go through the sharded layout a real model gets
    shard = ["--max_shard_size", "200KB"] if train_type == "full" else []
    fp32 = export_main(["--deepspeed_to_fp32", str(ckpt), "--output_dir", str(tmp_path / "fp32"), *shard])
    if train_type == "lora":
        from peft import PeftModel

        consolidated = load_file(str(fp32 / "adapter_model.safetensors"))
        saved = load_file(str(ckpt / "adapter_model.safetensors"))  # what the Trainer wrote beside the ZeRO shards
        assert consolidated.keys() == saved.keys() and len(saved) > 0
        for k, v in saved.items():
            assert consolidated[k].dtype == torch.float32 and torch.equal(consolidated[k], v.float()), k
        assert not (fp32 / "model.safetensors").exists()
        model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_path("qwen3_vl")), str(fp32))
        assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    else:
        assert (fp32 / "config.json").exists() and (fp32 / "chat_template.jinja").exists()
        assert (fp32 / "model.safetensors.index.json").exists() and len(list(fp32.glob("model-*.safetensors"))) > 1
        import transformers  # the processor is named by its transformers class, not vltune's local fallback

        assert hasattr(transformers, json.loads((fp32 / "processor_config.json").read_text())["processor_class"])
        got = AutoModelForImageTextToText.from_pretrained(fp32).state_dict()
        want = AutoModelForImageTextToText.from_pretrained(ckpt).state_dict()
        base = AutoModelForImageTextToText.from_pretrained(tiny_path("qwen3_vl")).state_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
        assert any(not torch.equal(want[k], base[k]) for k in want), "full fine-tuning must have changed weights"


def test_export_refuses_a_folder_without_a_zero_checkpoint(tmp_path):
    from vltune.recipes.export import main as export_main

    if not HAS_DEEPSPEED:
        with pytest.raises(UsageError, match=r"vltune\[deepspeed\]"):
            export_main(["--deepspeed_to_fp32", str(tmp_path), "--output_dir", str(tmp_path / "o")])
    else:
        with pytest.raises(UsageError, match="checkpoint-N"):
            export_main(["--deepspeed_to_fp32", str(tmp_path), "--output_dir", str(tmp_path / "o")])


# ---------------------------------------------------------------------------- --fsdp presets
def test_fsdp2_presets_become_fsdp_config(tmp_path, monkeypatch):
    from vltune.distributed import FSDP_PRESETS

    # TrainingArguments writes fsdp_config's cpu_ram_efficient_loading into this variable: undo it after
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")

    assert set(FSDP_PRESETS) == {"fsdp2", "fsdp2_offload"}
    *_, args = parse_args(GROUPS, ["--fsdp", "fsdp2", "--output_dir", str(tmp_path)])
    assert args.fsdp and args.fsdp_config["version"] == 2 and args.fsdp_config["reshard_after_forward"] is True
    assert not args.fsdp_config.get("cpu_offload")
    plugin = args._process_fsdp_args()  # what accelerate's FSDP plugin is built from
    assert plugin["fsdp_version"] == 2 and plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    *_, args = parse_args(GROUPS, ["--fsdp=fsdp2_offload", "--output_dir", str(tmp_path)])
    assert args.fsdp_config["cpu_offload"] is True
    with pytest.raises(UsageError, match="fsdp2, fsdp2_offload"):
        parse_args(GROUPS, ["--fsdp", "fsdp2_ofload", "--output_dir", str(tmp_path)])
