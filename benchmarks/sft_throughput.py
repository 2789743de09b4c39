"""SFT throughput: vltune vs TRL, ms-swift and LLaMA-Factory on the same model, data and settings.

Not part of CI. One run trains, one tool after the other, each in its own process:

  vltune        `python -m vltune sft` (this environment)
  trl           a plain TRL `SFTTrainer` (this environment), prompt-completion data, completion-only loss
  swift         `swift sft` (ms-swift 4.6.0, own venv: it pins transformers < 5.20)
  llamafactory  `llamafactory-cli train` (LLaMA-Factory 0.9.5, own venv: transformers 5.6.0)

on the same tiny Qwen2.5-VL (vltune's tiny builder with Qwen's real special-token ids, see
benchmarks/bench_model.py), the same synthetic grounding data (`vltune.data.synthetic`), and matched
settings: LoRA on every linear layer of the LLM (vision tower + merger frozen), rank 8, alpha 32,
dropout 0, lr 1e-4 cosine, no warm-up, no weight decay, AdamW betas (0.9, 0.999), clip 1.0, batch 4,
grad accum 1, fp32 (tiny) / bf16 (realistic), gradient checkpointing off, seed 42, no pre-shuffle,
no checkpoints, logging every step, report_to none.

Every tool is measured by the same code (benchmarks/peer_site/sitecustomize.py hooks
`transformers.Trainer` in every process): per optimizer step the wall time at its end and the
samples / non-pad tokens / trained tokens of its batch. Throughput is taken over the steps after
the first `--warmup` ones; peak RSS is the sum over the tool's process tree, polled every 0.1 s.

    python benchmarks/sft_throughput.py                              # all four tools, 100 steps
    python benchmarks/sft_throughput.py --tools vltune,trl --steps 30
    python benchmarks/sft_throughput.py --config realistic --device cuda --steps 30   # GPU only

`--config realistic` trains a randomly initialised Qwen2.5-VL-3B-sized model (text hidden 2048 x 36
layers, vision tower as in the real 3B) with vltune and TRL only, in bf16, and reports tokens/s and
MFU. On a CPU it refuses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SITE = HERE / "peer_site"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

ALL_TOOLS = ("vltune", "trl", "swift", "llamafactory", "vltune_pack", "vltune_pf", "bare_pad", "bare_pack")
REALISTIC_TOOLS = "vltune,vltune_pack,vltune_pf,bare_pad,bare_pack,trl,swift"
# Realistic data: screenshot sizes (GUI screens of `vltune data synth gui`) mixed with the 112 px demo boards.
REALISTIC_SCREENS = ((224, 448), (448, 224), (336, 336), (448, 448))
FILLER = ("the", "icon", "is", "in", "row", "column", "left", "right", "top", "bottom", "of", "screen", "app",
          "button", "next", "to", "above", "below", "so", "I", "will", "tap", "it", "first", "then", "open")
# LLM linear layers of Qwen2.5-VL (what `all-linear` means once vision tower + merger are frozen).
LLM_LORA_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# bf16 dense peak, TFLOP/s (peers.md: H100 SXM 989; the H200 has the same tensor cores).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


# =============================================================================== setup
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["tiny", "realistic"], default="tiny",
                    help="tiny: vltune's xs Qwen2.5-VL with the Qwen vocabulary (CPU ok); realistic: a random "
                         "Qwen2.5-VL-3B-sized model, vltune and TRL only, GPU only")
    ap.add_argument("--tools", default=None,
                    help=f"comma-separated subset of {','.join(ALL_TOOLS)} (default: all; realistic: vltune,trl)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per tool (default 100)")
    ap.add_argument("--warmup", type=int, default=10, help="steps excluded from throughput (default 10)")
    ap.add_argument("--loss_step", type=int, default=10, help="step whose loss is compared (default 10)")
    ap.add_argument("--batch", type=int, default=4, help="per-device batch size (default 4)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--size", choices=["xs", "s"], default="xs", help="tiny model size (vltune's tiny sizes)")
    ap.add_argument("--image_cell", type=int, default=None,
                    help="pixels per board cell (4x4 board); default 28 (tiny: 16 image tokens), 224 realistic "
                         "(896 px: 1024 image tokens)")
    ap.add_argument("--data", choices=["grounding", "realistic"], default="grounding",
                    help="grounding: the demo's uniform boards (53 tokens a sample); realistic: mixed screenshot "
                         "sizes + demo boards, 1-4 turns, short and long answers (tiny config only); its default "
                         "tools add vltune --packing / --padding_free and the bare PyTorch loop")
    ap.add_argument("--eval_samples", type=int, default=16,
                    help="realistic data: held-out conversations for the loss-per-token comparison")
    ap.add_argument("--workdir", default="/tmp/vltune-bench", help="model, data, outputs, logs")
    ap.add_argument("--venvs", default=None, help="where the peers' venvs live (default WORKDIR/venvs)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for every tool (default: unset, torch picks the core count)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every tool N times, interleaved (tool order rotated each round); the table shows "
                         "medians and the samples/s range")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per tool before it is killed")
    ap.add_argument("--json", default=None, help="also write the results here (default WORKDIR/runs/<run id>/results.json)")
    ap.add_argument("--_shrunk", action="store_true", help=argparse.SUPPRESS)  # test the realistic path on a CPU
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_spec", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def prepare_data(workdir: Path, model_dir: str, n_train: int, cell: int) -> dict:
    """The demo's synthetic grounding set, in each tool's format. Returns the file paths."""
    from vltune.data.synthetic import make_grounding_set
    from vltune.models.load import load_processor

    data = workdir / f"data-{cell}px-{n_train}"
    done = data / "DONE"
    paths = {
        "jsonl": str(data / "train.jsonl"),  # ms-swift format (vltune, ms-swift), absolute image paths
        "trl": str(data / "trl.jsonl"),  # TRL prompt-completion (conversational)
        "lf_dir": str(data / "llamafactory"),  # dataset_info.json + train.json (sharegpt-style)
    }
    if done.exists():
        return paths
    processor = load_processor(model_dir)
    made = make_grounding_set(data / "raw", n_train=n_train, n_test=0, grid=4, cell=cell, seed=0,
                              convention="abs_resized", processor=processor)
    rows = [json.loads(line) for line in open(made["train"], encoding="utf-8")]
    raw = Path(made["train"]).parent
    clean = []
    for r in rows:
        # Only messages + images: ms-swift would treat `objects` as grounding annotations and rewrite them.
        clean.append({"messages": r["messages"], "images": [str((raw / p).resolve()) for p in r["images"]]})
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        for r in clean:
            f.write(json.dumps(r) + "\n")
    with open(paths["trl"], "w", encoding="utf-8") as f:
        for r in clean:
            user, assistant = r["messages"][0]["content"], r["messages"][1]["content"]
            f.write(json.dumps({
                "prompt": [{"role": "user", "content": [
                    {"type": "image"}, {"type": "text", "text": user.replace("<image>", "", 1)}]}],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": assistant}]}],
                "images": r["images"]}) + "\n")
    lf = Path(paths["lf_dir"])
    lf.mkdir(parents=True, exist_ok=True)
    (lf / "train.json").write_text(json.dumps(clean))
    (lf / "dataset_info.json").write_text(json.dumps({"bench_grounding": {
        "file_name": "train.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant", "system_tag": "system"}}}, indent=2))
    done.write_text("ok\n")
    return paths


def prepare_realistic_data(workdir: Path, model_dir: str, n_train: int, n_eval: int) -> dict:
    """Real-shaped SFT data: GUI screenshots of several sizes plus demo boards (16 to ~250 image tokens each),
    conversations of 1-4 turns (one image per user turn), half the answers with a "Thought:" of 3-60 words.
    Written as ms-swift JSONL (vltune, ms-swift; plus a held-out eval.jsonl) and TRL prompt-completion JSONL
    (TRL trains only the last answer: prompt = everything before it)."""
    import random

    from vltune.data.synthetic import make_grounding_set
    from vltune.data.synthetic_gui import make_gui_set
    from vltune.models.load import load_processor

    data = workdir / f"data-realistic-{n_train}-{n_eval}"
    paths = {"jsonl": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "trl": str(data / "trl.jsonl")}
    if (data / "DONE").exists():
        return paths
    processor = load_processor(model_dir)
    per_pool = max(8, (n_train + n_eval) * 3 // (len(REALISTIC_SCREENS) + 1))
    pools = []
    for k, screen in enumerate(REALISTIC_SCREENS):
        made = make_gui_set(data / "raw" / f"gui-{screen[0]}x{screen[1]}", train_users="3-4", test_users="1-2",
                            samples_per_user=per_pool // 2, test_per_user=1, screen=screen, seed=k,
                            convention="abs_resized", processor=processor, pickles=False)
        pools.append(made["train"])
    pools.append(make_grounding_set(data / "raw" / "boards", n_train=per_pool, n_test=0, grid=4, cell=28, seed=0,
                                    convention="abs_resized", processor=processor)["train"])
    turns = []
    for path in pools:
        base = Path(path).parent
        for line in open(path, encoding="utf-8"):
            r = json.loads(line)
            turns.append((r["messages"][0]["content"], r["messages"][1]["content"],
                          str((base / r["images"][0]).resolve())))
    rng = random.Random(0)
    convs = []
    for _ in range(n_train + n_eval):
        msgs, images = [], []
        for user, answer, image in rng.sample(turns, rng.choice((1, 1, 2, 2, 3, 4))):
            if rng.random() < 0.5:
                answer = "Thought: " + " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, 60))) + ". " + answer
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            images.append(image)
        convs.append({"messages": msgs, "images": images})
    train, held = convs[:n_train], convs[n_train:]
    for name, rows in (("jsonl", train), ("eval", held)):
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def parts(text):
        out = []
        for i, piece in enumerate(text.split("<image>")):
            if i:
                out.append({"type": "image", "text": None})
            if piece:
                out.append({"type": "text", "text": piece})
        return out

    with open(paths["trl"], "w", encoding="utf-8") as f:
        for r in train:
            prompt = [{"role": m["role"], "content": parts(m["content"])} for m in r["messages"][:-1]]
            f.write(json.dumps({"prompt": prompt, "completion": [{"role": "assistant", "content": [
                {"type": "text", "text": r["messages"][-1]["content"]}]}], "images": r["images"]}) + "\n")
    (data / "DONE").write_text("ok\n")
    return paths


# =============================================================================== tools
def common_env(trace: Path, register_processor: bool, threads: int | None, device: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SITE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["VLTUNE_BENCH_TRACE"] = str(trace)
    if register_processor:
        env["VLTUNE_BENCH_REGISTER_PROCESSOR"] = "1"
    else:
        env.pop("VLTUNE_BENCH_REGISTER_PROCESSOR", None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_DISABLED="true",
               WANDB_MODE="disabled", DISABLE_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", USE_MODELSCOPE_HUB="0")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def cmd_vltune(s: dict) -> list[str]:
    return [sys.executable, "-m", "vltune", "sft", "--model", s["model"], "--dataset", s["data"]["jsonl"],
            "--train_type", "lora", "--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0",
            "--target_modules", "all-linear", "--freeze_vit", "true", "--freeze_aligner", "true",
            "--learning_rate", str(s["lr"]), "--lr_scheduler_type", "cosine", "--warmup_steps", "0",
            "--weight_decay", "0", "--adam_beta2", "0.999", "--max_grad_norm", "1.0",
            "--per_device_train_batch_size", str(s["batch"]), "--gradient_accumulation_steps", "1",
            "--max_steps", str(s["steps"]), "--gradient_checkpointing", "false",
            "--torch_dtype", s["dtype"], *(["--bf16", "true"] if s["dtype"] == "bfloat16" else []),
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "42",
            "--dataloader_num_workers", "0", "--device", s["device"], "--output_dir", s["out"],
            "--train_separator", "true",  # the peers also train the '\n' after <|im_end|>: same tokens, same loss
            *s.get("vltune_extra", [])]


def cmd_trl(s: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--_worker", "trl", "--_spec", json.dumps(s)]


def cmd_swift(s: dict, venv: Path) -> list[str]:
    return [str(venv / "bin" / "swift"), "sft", "--model", s["model"], "--model_type", "qwen2_5_vl",
            "--template", "qwen2_5_vl", "--check_model", "false", "--use_hf", "true",
            "--dataset", s["data"]["jsonl"], "--dataset_shuffle", "false", "--split_dataset_ratio", "0",
            "--tuner_type", "lora", "--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0",
            "--target_modules", "all-linear", "--freeze_vit", "true", "--freeze_aligner", "true",
            "--learning_rate", str(s["lr"]), "--lr_scheduler_type", "cosine", "--warmup_ratio", "0",
            "--weight_decay", "0", "--adam_beta2", "0.999", "--max_grad_norm", "1.0",
            "--per_device_train_batch_size", str(s["batch"]), "--gradient_accumulation_steps", "1",
            "--max_steps", str(s["steps"]), "--gradient_checkpointing", "false", "--torch_dtype", s["dtype"],
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "42",
            "--data_seed", "42", "--dataloader_num_workers", "0", "--dataset_num_proc", "1",
            "--max_length", "2048", "--add_version", "false", "--output_dir", s["out"]]


def cmd_llamafactory(s: dict, venv: Path) -> list[str]:
    import yaml

    cfg = {
        "model_name_or_path": s["model"], "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target": "all",
        "freeze_vision_tower": True, "freeze_multi_modal_projector": True,
        "dataset": "bench_grounding", "dataset_dir": s["data"]["lf_dir"], "template": "qwen2_vl",
        "cutoff_len": 2048, "overwrite_cache": True, "preprocessing_num_workers": None,
        "output_dir": s["out"], "overwrite_output_dir": True, "logging_steps": 1, "save_strategy": "no",
        "plot_loss": False, "report_to": "none", "per_device_train_batch_size": s["batch"],
        "gradient_accumulation_steps": 1, "learning_rate": s["lr"], "max_steps": s["steps"],
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.0, "weight_decay": 0.0, "adam_beta2": 0.999,
        "max_grad_norm": 1.0, "bf16": s["dtype"] == "bfloat16", "fp16": False,
        "disable_gradient_checkpointing": True, "seed": 42, "dataloader_num_workers": 0,
        "use_cpu": s["device"] == "cpu", "ddp_timeout": 180000000,
    }
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = Path(s["out"]).with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return [str(venv / "bin" / "llamafactory-cli"), "train", str(path)]


TRAINS_ON = {
    "vltune": "assistant turn `click(x, y)<|im_end|>\\n` (assistant-only labels, --train_separator true)",
    "trl": "completion = `click(x, y)<|im_end|>\\n` (prompt-completion data, completion_only_loss; TRL "
           "refuses assistant_only_loss for VLMs)",
    "swift": "assistant turn `click(x, y)<|im_end|>\\n` (--loss_scale default)",
    "llamafactory": "assistant turn `click(x, y)<|im_end|>\\n` (train_on_prompt false)",
}


# =============================================================================== TRL worker
def trl_worker(s: dict) -> None:
    """A plain TRL SFTTrainer run (what a TRL user writes), in its own process."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in open(s["data"]["trl"], encoding="utf-8")]
    features = datasets.Features({
        "prompt": [{"role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "completion": [{"role": datasets.Value("string"),
                        "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image()) if not hasattr(datasets, "List")
        else datasets.List(datasets.Image()),
    })
    ds = datasets.Dataset.from_list(rows, features=features)
    dtype = getattr(torch, s["dtype"])
    processor = AutoProcessor.from_pretrained(s["model"])
    if not hasattr(processor, "image_processor"):
        raise SystemExit(f"AutoProcessor gave {type(processor).__name__}, not a VLM processor")
    model = AutoModelForImageTextToText.from_pretrained(s["model"], dtype=dtype)
    model.config.use_cache = False
    peft_config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=LLM_LORA_REGEX,
                             bias="none", task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=s["out"], per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
        max_steps=s["steps"], learning_rate=s["lr"], lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, adam_beta2=0.999, max_grad_norm=1.0, gradient_checkpointing=False,
        bf16=s["dtype"] == "bfloat16", fp16=False, use_cpu=s["device"] == "cpu", logging_steps=1,
        save_strategy="no", report_to="none", seed=42, dataloader_num_workers=0, max_length=2048,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor,
                         peft_config=peft_config)
    trainer.train()
    trainer.save_model(s["out"])


# =============================================================================== bare PyTorch loop
def bare_worker(s: dict) -> None:
    """The ceiling: forward + backward + AdamW on pre-collated batches (vltune's padded or packed batches of the
    same data), no Trainer, no data loading in the timed loop. Writes the same trace as the Trainer hook."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vltune.data.dataset import SFTCollator, SFTDataset, validate_samples
    from vltune.data.formats import read_dataset
    from vltune.data.packing import PackedDataset, PaddingFreeCollator, find_rope_index
    from vltune.models.load import load_processor

    torch.manual_seed(42)
    processor = load_processor(s["model"])
    model = AutoModelForImageTextToText.from_pretrained(s["model"], dtype=getattr(torch, s["dtype"])).to(s["device"])
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=LLM_LORA_REGEX))
    samples, _ = read_dataset([s["data"]["jsonl"]])
    kept, lengths, _ = validate_samples(samples, processor, 4096)
    ds = SFTDataset(kept, lengths)
    if s["mode"] == "pack":
        items = PackedDataset(ds, s["packing_length"], seed=42)
        collate = PaddingFreeCollator(processor, rope_index=find_rope_index(model), keep_trained_logits=True,
                                      train_separator=True)
        per_batch = 1
    else:
        items = ds
        collate = SFTCollator(processor, logits_to_keep=True, train_separator=True)
        per_batch = s["batch"]
    order = list(range(len(items)))
    random.Random(42).shuffle(order)
    batches = []
    for k in range(s["steps"]):
        idx = [order[(k * per_batch + j) % len(order)] for j in range(per_batch)]
        batch = collate([items[i] for i in idx])
        batches.append({k: v.to(s["device"]) if torch.is_tensor(v) else v for k, v in batch.items()})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s["lr"], weight_decay=0.0)
    model.train()
    rows, losses, t_begin = [], {}, time.time()
    for step, batch in enumerate(batches, 1):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = float(loss)  # the sync a Trainer's logging_steps 1 also pays
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is not None:
            n, tokens = ids.shape[0], int(mask.sum())
        else:
            pos = batch["position_ids"]
            n, tokens = int(((pos[0] if pos.dim() == 3 else pos) == 0).sum()), ids.numel()
        rows.append({"step": step, "t": time.time(), "samples": n, "tokens": tokens,
                     "trained": int((batch["labels"] != -100).sum()), "padded": ids.numel(), "fp": 0})
    Path(os.environ["VLTUNE_BENCH_TRACE"]).write_text(json.dumps(
        {"t_begin": t_begin, "t_end": time.time(), "steps": rows, "losses": losses, "trainer": "bare"}))


# =============================================================================== measuring
class TreeMonitor:
    """Peak resident memory of a process and all its descendants, polled in a thread, plus the CPU time
    that *other* processes used meanwhile (this machine may be shared: a busy neighbour skews timings)."""

    def __init__(self, pid: int, every: float = 0.1):
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.peak = 0
        self.cpu_by_pid: dict = {}
        self._busy0 = self._busy()
        self._t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.proc] + self.proc.children(recursive=True):
                    try:
                        with p.oneshot():
                            total += p.memory_info().rss
                            c = p.cpu_times()
                            self.cpu_by_pid[p.pid] = c.user + c.system
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                break
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def stop(self) -> tuple[int, float]:
        """(peak RSS bytes, share of the machine's CPU capacity used by other processes during the run)."""
        import psutil

        self._stop.set()
        self._thread.join(timeout=2)
        wall = max(time.time() - self._t0, 1e-6)
        foreign = self._busy() - self._busy0 - sum(self.cpu_by_pid.values())
        return self.peak, max(0.0, foreign) / (wall * psutil.cpu_count())


def run_tool(name: str, cmd: list[str], env: dict, log: Path, timeout: int, cwd: Path) -> dict:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(cwd),
                                start_new_session=True)
        mon = TreeMonitor(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = "timeout"
        peak, foreign = mon.stop()
    return {"rc": rc, "t_start": t0, "wall_s": time.time() - t0, "peak_rss": peak, "other_cpu": foreign}


def summarize(trace_path: Path, run: dict, warmup: int, loss_step: int) -> dict:
    out = dict(run)
    if not trace_path.exists():
        out["error"] = "no trace written (the run failed before the end of training)"
        return out
    tr = json.loads(trace_path.read_text())
    steps = tr["steps"]
    out["steps_done"] = len(steps)
    losses = {int(k): v for k, v in tr["losses"].items()}
    out["loss_1"] = losses.get(1)
    out["loss_k"] = losses.get(loss_step)
    out["losses"] = losses
    out["startup_s"] = (tr["t_begin"] or run["t_start"]) - run["t_start"]
    out["fingerprints"] = [r.get("fp") for r in steps]
    if len(steps) > warmup + 1:
        window = steps[warmup:]
        dt = window[-1]["t"] - steps[warmup - 1]["t"] if warmup > 0 else window[-1]["t"] - tr["t_begin"]
        out["measured_steps"] = len(window)
        out["step_s"] = dt / len(window)
        out["samples_s"] = sum(r["samples"] for r in window) / dt
        out["tokens_s"] = sum(r["tokens"] for r in window) / dt
        out["trained_s"] = sum(r["trained"] for r in window) / dt
        out["tokens_per_sample"] = sum(r["tokens"] for r in window) / max(1, sum(r["samples"] for r in window))
        out["padded_frac"] = 1 - sum(r["tokens"] for r in window) / max(1, sum(r["padded"] for r in window))
        out["tokens_total"] = sum(r["tokens"] for r in window)
        out["tokens_all"] = sum(r["tokens"] for r in steps)
    for k in ("cuda_peak_allocated", "cuda_peak_reserved"):
        if k in tr:
            out[k] = tr[k]
    return out


def aggregate(runs: list[dict]) -> dict:
    """Median over the repeats of the timing/memory figures; losses and fingerprints from the first good run."""
    import statistics

    good = [r for r in runs if r.get("rc") == 0 and r.get("samples_s")]
    if not good:
        return runs[-1] if runs else {"error": "not run"}
    out = dict(good[0])
    for k in ("samples_s", "tokens_s", "trained_s", "step_s", "peak_rss", "cuda_peak_allocated",
              "cuda_peak_reserved", "startup_s", "wall_s", "other_cpu"):
        vals = [r[k] for r in good if r.get(k) is not None]
        if vals:
            out[k] = statistics.median(vals)
    out["samples_s_all"] = [r["samples_s"] for r in good]
    out["runs_ok"], out["runs"] = len(good), len(runs)
    out["loss_repeatable"] = all(r.get("losses") == good[0].get("losses") for r in good)
    return out


# =============================================================================== realistic config
def realistic_config(tok, shrunk: bool = False):
    """Qwen2.5-VL-3B's architecture (text hidden 2048 x 36 layers, GQA 16/2, vision tower 32 x 1280), random init."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    text = dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
        tie_word_embeddings=True, use_cache=False)
    vision = dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", tokens_per_second=2)
    if shrunk:  # the same code path at toy size, to test this mode on a CPU
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
        vision.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    return config


def build_realistic_model(out_dir: Path, device: str, shrunk: bool = False) -> str:
    """A randomly initialised Qwen2.5-VL-3B-sized model (bf16), the Qwen-id tokenizer, real-size processor."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from bench_model import PROCESSOR_CLASS, _portable_configs, qwen_id_tokenizer
    from vltune.models.processors import IMAGE_ONLY_PROCESSORS
    from vltune.models.tiny import _trl_template

    if (out_dir / "BENCH_MODEL").exists():
        return str(out_dir)
    tok = qwen_id_tokenizer()
    config = realistic_config(tok, shrunk)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, temporal_patch_size=2, merge_size=2,
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
    processor = IMAGE_ONLY_PROCESSORS["qwen2_5_vl"](image_processor=image_processor, tokenizer=tok,
                                                    chat_template=_trl_template("qwen2_5_vl"))
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    _portable_configs(tmp)
    (tmp / "BENCH_MODEL").write_text(f"realistic-3b {PROCESSOR_CLASS}\n")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tmp.rename(out_dir)
    return str(out_dir)


def flop_counts(model_dir_or_config) -> dict:
    """Parameter counts for the FLOP formula (from a weightless meta model)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = (AutoConfig.from_pretrained(model_dir_or_config) if isinstance(model_dir_or_config, (str, Path))
              else model_dir_or_config)
    with torch.device("meta"):
        m = AutoModelForImageTextToText.from_config(config)
    n_vit = sum(p.numel() for n, p in m.named_parameters() if ".visual." in f".{n}")
    n_embed = m.get_input_embeddings().weight.numel()
    n_llm = sum(p.numel() for n, p in m.named_parameters() if ".visual." not in f".{n}")  # tied head counted once
    tc = config.text_config
    return {"n_llm_matmul": n_llm, "n_embed": n_embed, "n_vit": n_vit, "layers": tc.num_hidden_layers,
            "hidden": tc.hidden_size, "vit_merge": config.vision_config.spatial_merge_size}


def gpu_peak_tflops() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu (no GPU: MFU is computed against an H100's 989 TFLOP/s only to test the formula)", 989.0
    name = torch.cuda.get_device_name(0)
    for key, v in PEAK_TFLOPS.items():
        if key in name:
            return name, v
    return name, None


def add_mfu(results: dict, fc: dict, cell: int, gpu: str, peak: float | None):
    """Add MFU to each result; return (extra table columns, notes stating the formula).

    Per non-pad token of the LLM (text + image tokens): forward 2N; backward 2N for the activation gradients
    (the base is frozen: no weight gradients; LoRA's are negligible) -> 4N; the conventional 6N also counts
    the frozen weights' gradients. Attention adds 6*L*d*s per token (fwd+bwd, causal: half of PaLM's
    12*L*d*s). The frozen vision tower sits in front of every trainable parameter, so it runs forward
    only: 2*N_vit per image patch.
    """
    N = fc["n_llm_matmul"]  # the tied embedding matrix counted once: it is the lm_head matmul
    notes = [
        f"FLOP formula: N = {N / 1e9:.3f} B LLM parameters (the tied embedding counted once, as the lm_head "
        f"matmul), N_vit = {fc['n_vit'] / 1e9:.3f} B, L = {fc['layers']}, d = {fc['hidden']}, "
        f"s = non-pad tokens per sample.",
        "  MFU(6N) = (6*N + 6*L*d*s) * tokens/s / peak    (the usual convention: counts frozen-weight gradients)",
        "  MFU(hw) = ((4*N + 6*L*d*s) * tokens/s + 2*N_vit * patches/s) / peak    (what LoRA on a frozen base "
        "really computes: no frozen-weight gradients; the frozen ViT runs forward only)",
        f"  GPU {gpu}, bf16 dense peak {peak} TFLOP/s",
    ]
    for r in results.values():
        if r.get("tokens_s") and peak:
            s = r["tokens_per_sample"]
            patches = (cell * 4 / 28) ** 2 * fc["vit_merge"] ** 2  # 14 px patches of the 4x4-cell board
            attn = 6 * fc["layers"] * fc["hidden"] * s
            r["tflops_6n"] = (6 * N + attn) * r["tokens_s"] / 1e12
            r["mfu_6n"] = r["tflops_6n"] / peak
            r["mfu_hw"] = ((4 * N + attn) * r["tokens_s"] + 2 * fc["n_vit"] * patches * r["samples_s"]) / (peak * 1e12)
    extra = {"TFLOP/s(6N)": lambda r: fmt(r.get("tflops_6n"), ".0f"),
             "MFU(6N)": lambda r: fmt(100 * r["mfu_6n"], ".1f") + "%" if r.get("mfu_6n") else "-",
             "MFU(hw)": lambda r: fmt(100 * r["mfu_hw"], ".1f") + "%" if r.get("mfu_hw") else "-"}
    return extra, notes


def data_lengths(model_dir: str, jsonl: str) -> list[int]:
    """Token count of every sample (image tokens included), as vltune counts them."""
    from vltune.data.dataset import validate_samples
    from vltune.data.formats import read_dataset
    from vltune.models.load import load_processor

    samples, _ = read_dataset([jsonl])
    return validate_samples(samples, load_processor(model_dir), 4096, verify_images=False)[1]


def packing_report(results: dict, shape: str):
    """Extra columns and notes for the realistic-data run: eval loss, tokens seen, share of the bare loop."""
    extra = {"eval loss/token": lambda r: fmt(r.get("eval_loss"), ".4f"),
             "tokens seen": lambda r: fmt(r.get("tokens_all"), ".0f"),
             "pad %": lambda r: fmt(100 * r["padded_frac"], ".0f") if r.get("padded_frac") is not None else "-"}
    notes = [shape.replace("[bench] ", "Data: ")]
    for name, ceiling in (("vltune", "bare_pad"), ("vltune_pf", "bare_pack"), ("vltune_pack", "bare_pack")):
        v, c = results.get(name, {}), results.get(ceiling, {})
        if v.get("tokens_s") and c.get("tokens_s"):
            notes.append(f"{name} / {ceiling} (bare forward+backward+AdamW on the same kind of batches): "
                         f"{100 * v['tokens_s'] / c['tokens_s']:.0f}% of its non-pad tokens/s")
    peers = {n: r for n, r in results.items() if n in ("trl", "swift", "llamafactory") and r.get("samples_s")}
    pack = results.get("vltune_pack", {})
    if peers and pack.get("samples_s"):
        best = max(peers, key=lambda n: peers[n]["samples_s"])
        lean = min(peers, key=lambda n: peers[n]["peak_rss"])
        notes.append(f"vltune --packing / fastest peer ({best}): {pack['samples_s'] / peers[best]['samples_s']:.2f}x "
                     f"samples/s; peak RSS / leanest peer ({lean}): {pack['peak_rss'] / peers[lean]['peak_rss']:.2f}x")
    notes.append("eval loss/token: vltune's loss on the held-out conversations after the run (TRL and ms-swift are "
                 "not evaluated); ms-swift runs unpacked: its --packing / --padding_free refuse sdpa and eager, "
                 "i.e. need flash-attn, which a CPU has not. TRL trains only each conversation's last answer "
                 "(prompt-completion: it refuses assistant-only loss for VLMs), so its trained tokens differ.")
    return extra, notes


# =============================================================================== report
def fmt(v, spec=".1f", none="-"):
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(results: dict, a, device: str, extra_cols: dict | None = None) -> str:
    lines = []
    cols = ["tool", "status", "samples/s", "range", "tok/s", "trained tok/s", "s/step", "peak RSS MB"]
    if device == "cuda":
        cols += ["peak CUDA alloc MB"]
    cols += ["loss@1", f"loss@{a.loss_step}", "start-up s", "wall s", "other CPU"]
    if extra_cols:
        cols += list(extra_cols)
    rows = []
    for name, r in results.items():
        if r.get("skipped"):
            rows.append([name, "skipped"] + ["-"] * (len(cols) - 2))
            continue
        status = "ok" if r.get("rc") == 0 and "samples_s" in r else f"FAILED rc={r.get('rc')}"
        rng = r.get("samples_s_all") or []
        rng = f"{min(rng):.1f}-{max(rng):.1f}" if len(rng) > 1 else "-"
        row = [name, status, fmt(r.get("samples_s")), rng, fmt(r.get("tokens_s"), ".0f"), fmt(r.get("trained_s"), ".0f"),
               fmt(r.get("step_s"), ".4f"), fmt(r.get("peak_rss", 0) / 2**20, ".0f")]
        if device == "cuda":
            row.append(fmt(r.get("cuda_peak_allocated", float("nan")) / 2**20, ".0f"))
        row += [fmt(r.get("loss_1"), ".6f"), fmt(r.get("loss_k"), ".6f"), fmt(r.get("startup_s"), ".1f"),
                fmt(r.get("wall_s"), ".1f"), fmt(100 * r["other_cpu"], ".0f") + "%" if r.get("other_cpu") is not None else "-"]
        if extra_cols:
            row += [fn(r) for fn in extra_cols.values()]
        rows.append(row)
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(cols, widths)) + " |")
    lines.append(sep)
    for r in rows:
        lines.append("| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def report(results: dict, a, device: str, spec: dict, extra_cols=None, notes=None) -> str:
    out = [f"\n=== SFT throughput: {a.config} config, {device}, {a.steps} steps, batch {a.batch}, "
           f"warm-up {a.warmup} steps excluded, {a.repeats} round(s): medians ==="]
    out.append(print_table(results, a, device, extra_cols))
    out.append("(samples/s: median over rounds, range = min-max; other CPU = share of the machine's CPU used by "
               "processes outside the measured tool during its run: > ~10% means the figure is contended)")
    v = results.get("vltune", {})
    if v.get("samples_s"):
        out.append("\nvltune / peer (samples/s ratio; >1 = vltune faster; tokens/s ratio in brackets):")
        for name, r in results.items():
            if name != "vltune" and r.get("samples_s"):
                out.append(f"  vltune / {name:<13} {v['samples_s'] / r['samples_s']:.2f}x  "
                           f"[{v['tokens_s'] / r['tokens_s']:.2f}x]   peak RSS {v['peak_rss'] / max(r['peak_rss'], 1):.2f}x")
    from importlib.metadata import PackageNotFoundError, version

    def _v(name):
        try:
            return version(name)
        except PackageNotFoundError:  # e.g. vltune used from a source tree on PYTHONPATH
            mod = sys.modules.get(name)
            return getattr(mod, "__version__", "source tree")

    out.append(f"\nEnvironments: vltune + trl: vltune {_v('vltune')}, trl {_v('trl')}, transformers {_v('transformers')}, "
               f"peft {_v('peft')}, torch {_v('torch')}")
    for name, r in results.items():
        if r.get("versions"):
            out.append(f"  {name} venv: {r['versions']}")
    out.append("\nWhat each tool trains on (tokens/sample = non-pad input tokens incl. image tokens):")
    for name, r in results.items():
        if not r.get("skipped"):
            out.append(f"  {name:<13} {TRAINS_ON.get(name, '')}; tokens/sample "
                       f"{fmt(r.get('tokens_per_sample'))}, trained/sample "
                       f"{fmt((r.get('trained_s') or 0) / (r.get('samples_s') or float('nan')), '.2f')}")
        else:
            out.append(f"  {name:<13} skipped: {r['skipped']}")
    # loss agreement
    ks = [(n, r.get("loss_1"), r.get("loss_k")) for n, r in results.items() if r.get("loss_k") is not None]
    if len(ks) > 1:
        out.append(f"\nLoss agreement (step 1 = same weights: masking/data must match; step {a.loss_step} "
                   f"also needs the same data order and LoRA init):")
        ref = dict((n, (l1, lk)) for n, l1, lk in ks)
        peers = [n for n, _, _ in ks if n != "vltune"]
        base = peers[0] if peers else None
        for n, l1, lk in ks:
            if base and n != base:
                d1 = abs(l1 - ref[base][0]) if l1 is not None and ref[base][0] is not None else float("nan")
                dk = abs(lk - ref[base][1])
                out.append(f"  {n:<13} |loss@1 - {base}| = {d1:.2e}   |loss@{a.loss_step} - {base}| = {dk:.2e}"
                           + ("   <-- differs" if dk > 1e-3 * max(1.0, abs(lk)) else ""))
        fps = {n: r.get("fingerprints") for n, r in results.items() if r.get("fingerprints")}
        if base in fps:
            k = a.loss_step
            same = [n for n in fps if n != base and fps[n][:k] == fps[base][:k]]
            diff = [n for n in fps if n != base and fps[n][:k] != fps[base][:k]]
            out.append(f"  batches of steps 1-{k} (sum of non-pad input ids): same as {base}: {', '.join(same) or '-'}"
                       f"; different: {', '.join(diff) or '-'}")
        unrepeatable = [n for n, r in results.items() if r.get("runs", 0) > 1 and not r.get("loss_repeatable")]
        if unrepeatable:
            out.append(f"  losses differed between repeats of: {', '.join(unrepeatable)}")
        if "vltune" in ref and base and abs(ref["vltune"][1] - ref[base][1]) > 1e-3 * max(1.0, abs(ref[base][1])):
            out.append("  vltune's loss differs from the peers': its labels or its data order differ (see LOG.md).")
            tv = (v.get("trained_s") or 0) / (v.get("samples_s") or float("nan"))
            tb = (results[base].get("trained_s") or 0) / (results[base].get("samples_s") or float("nan"))
            if abs(tv - tb) > 0.01:
                out.append(f"  trained tokens per sample differ: vltune {tv:.2f}, {base} {tb:.2f}")
    for n, r in results.items():
        if r.get("error") or (r.get("rc") not in (0, None) and not r.get("skipped")):
            out.append(f"\n{n}: {r.get('error') or 'failed'}; log: {r.get('log')}")
            if r.get("log_tail"):
                out.append("    " + "\n    ".join(r["log_tail"]))
    if notes:
        out.append("\n" + "\n".join(notes))
    text = "\n".join(out)
    print(text, flush=True)
    return text


def log_tail(path: Path, n: int = 6) -> list[str]:
    try:
        lines = [ln.rstrip() for ln in open(path, encoding="utf-8", errors="replace") if ln.strip()]
    except OSError:
        return []
    return [ln[:240] for ln in lines[-n:]]


# =============================================================================== main
def main(argv=None) -> int:
    a = parse_args(argv)
    if a._worker == "trl":
        trl_worker(json.loads(a._spec))
        return 0
    if a._worker == "bare":
        bare_worker(json.loads(a._spec))
        return 0
    device = resolve_device(a.device)
    if a.config == "realistic" and device != "cuda" and not a._shrunk:
        print("--config realistic trains a Qwen2.5-VL-3B-sized model (~3.8 B parameters): it is meant for a GPU "
              "machine and is refused on a CPU (a single step would take minutes and tens of GB of memory). "
              "Run it with --device cuda on a GPU, or use the default --config tiny here.", file=sys.stderr)
        return 2
    default_tools = ("vltune,trl" if a.config == "realistic" else REALISTIC_TOOLS if a.data == "realistic"
                     else "vltune,trl,swift,llamafactory")
    tools = [t.strip() for t in (a.tools or default_tools).split(",")]
    bad = [t for t in tools if t not in ALL_TOOLS]
    if bad:
        raise SystemExit(f"unknown tool(s) {bad}; choose from {ALL_TOOLS}")
    if a.config == "realistic" and set(tools) - {"vltune", "trl"}:
        raise SystemExit("--config realistic runs vltune and trl only")
    if a.warmup >= a.steps:
        raise SystemExit("--warmup must be smaller than --steps")
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    venvs = Path(a.venvs) if a.venvs else workdir / "venvs"
    run_id = time.strftime("%Y%m%d-%H%M%S")
    runs = workdir / "runs" / run_id
    print(f"[bench] device {device}; tools {', '.join(tools)}; outputs under {runs}", flush=True)

    t_setup = time.time()
    if a.config == "tiny":
        from bench_model import build_bench_model

        model = build_bench_model(workdir / f"model-{a.size}", a.size)
        cell = a.image_cell or 28
        dtype = "float32"
    else:
        model = build_realistic_model(workdir / ("model-shrunk" if a._shrunk else "model-qwen2_5_vl-3b-random"),
                                      device, shrunk=a._shrunk)
        cell = a.image_cell or 224
        dtype = "bfloat16"
    n_train = max(512, a.steps * a.batch) if a.config == "tiny" else a.steps * a.batch
    realistic_data = a.data == "realistic"
    if realistic_data:
        data = prepare_realistic_data(workdir, model, n_train=a.steps * a.batch, n_eval=a.eval_samples)
        lengths, packing_length = data_lengths(model, data["jsonl"]), None
        packing_length = max(max(lengths), round(a.batch * sum(lengths) / len(lengths)))
        from vltune.data.packing import length_histogram, pad_share

        shape = (f"[bench] realistic data: {len(lengths)} conversations, tokens min {min(lengths)} / mean "
                 f"{sum(lengths) / len(lengths):.0f} / max {max(lengths)}; padded batches of {a.batch} waste "
                 f"{100 * pad_share(lengths, a.batch, 42):.1f}% on padding; packs of up to {packing_length} tokens "
                 f"(~ the tokens of one padded batch, so every variant sees about the same tokens per step)")
        print(shape + "\n" + "\n".join("    " + h for h in length_histogram(lengths)), flush=True)
    else:
        data = prepare_data(workdir, model, n_train=n_train, cell=cell)
    print(f"[bench] model {model}; data {data['jsonl']} ({time.time() - t_setup:.0f} s setup)", flush=True)

    venv_info: dict = {}
    for name in tools:  # build the peers' venvs first: not part of any measurement
        if name in ("swift", "llamafactory"):
            from peer_envs import ensure_venv

            py, msg = ensure_venv(name, venvs)
            venv_info[name] = (py, msg)
            if py is None:
                print(f"[bench] {name}: skipped: {msg}", flush=True)
    runs_by_tool: dict = {t: [] for t in tools}
    for rep in range(a.repeats):
        order = tools[rep % len(tools):] + tools[:rep % len(tools)]
        for name in order:
            if name in venv_info and venv_info[name][0] is None:
                continue
            tag = f"{name}.r{rep}" if a.repeats > 1 else name
            out, trace, log = runs / tag, runs / f"{tag}.trace.json", runs / f"{tag}.log"
            spec = {"model": model, "data": data, "lr": a.lr, "batch": a.batch, "steps": a.steps, "dtype": dtype,
                    "device": device, "out": str(out)}
            if realistic_data:
                spec["packing_length"] = packing_length
                eval_flags = ["--val_dataset", data["eval"], "--per_device_eval_batch_size", str(a.eval_samples),
                              "--prediction_loss_only", "true", "--max_length", "4096"]
                spec["vltune_extra"] = {
                    "vltune": eval_flags, "vltune_pf": eval_flags + ["--padding_free", "true"],
                    "vltune_pack": eval_flags + ["--packing", "true", "--packing_length", str(packing_length),
                                                 "--per_device_train_batch_size", "1"]}.get(name, [])
            if name == "swift":
                cmd = cmd_swift(spec, venvs / name)
            elif name == "llamafactory":
                cmd = cmd_llamafactory(spec, venvs / name)
            elif name.startswith("vltune"):
                cmd = cmd_vltune(spec)
            elif name.startswith("bare"):
                spec["mode"] = "pack" if name == "bare_pack" else "pad"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", "bare", "--_spec", json.dumps(spec)]
            else:
                cmd = cmd_trl(spec)
            env = common_env(trace, register_processor=not name.startswith(("vltune", "bare")), threads=a.threads,
                             device=device)
            if name in ("swift", "llamafactory"):
                from peer_envs import SPECS

                env["VLTUNE_BENCH_STUB_MODULES"] = SPECS[name].get("stub_modules", "")
            print(f"[bench] {name} (round {rep + 1}/{a.repeats}): running ({log})", flush=True)
            run = run_tool(name, cmd, env, log, a.timeout, cwd=runs)
            r = summarize(trace, run, a.warmup, a.loss_step)
            r["log"], r["cmd"] = str(log), cmd
            eval_file = out / "train_results.json"
            if eval_file.exists():
                r["eval_loss"] = json.loads(eval_file.read_text()).get("eval_loss")
            if name in venv_info:
                r["versions"] = venv_info[name][1]
            if r.get("rc") != 0:
                r["log_tail"] = log_tail(log)
            runs_by_tool[name].append(r)
            print(f"[bench] {name}: rc={r['rc']} wall {r['wall_s']:.0f} s, samples/s {fmt(r.get('samples_s'))}, "
                  f"loss@{a.loss_step} {fmt(r.get('loss_k'), '.6f')}", flush=True)
    results: dict = {}
    for name in tools:
        if name in venv_info and venv_info[name][0] is None:
            results[name] = {"skipped": venv_info[name][1]}
        else:
            results[name] = aggregate(runs_by_tool[name])

    extra, notes = None, []
    if a.config == "realistic":
        gpu, peak = gpu_peak_tflops()
        extra, notes = add_mfu(results, flop_counts(model), cell, gpu, peak)
    if realistic_data:
        extra, notes = packing_report(results, shape)
    text = report(results, a, device, {}, extra, notes)
    res_path = Path(a.json) if a.json else runs / "results.json"
    res_path.parent.mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps({"argv": sys.argv, "device": device, "config": a.config, "model": model,
                                    "data": data, "results": results, "report": text}, indent=2, default=str))
    print(f"\n[bench] results: {res_path}; logs: {runs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
