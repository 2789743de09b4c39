"""Kill drills (issue 16 item 1): a training process is killed with SIGKILL at a random step, or while a checkpoint
is being written, then resumed with --resume_from_checkpoint true; every loss logged after the resume point must
equal the uninterrupted run's (same seed) to 1e-5, and the final weights must be equal.

Marker `drills` (not in the default suite: three training processes per drill); `benchmarks/drills.sh` runs them
all and prints what each did and whether it held. With $VLTUNE_DRILL_REPORT set, each drill appends its figures
there as one JSON line (written before the assertions, so a drill that did not hold is reported too)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vltune.checkpoints import MARKER, list_checkpoints

pytestmark = pytest.mark.drills
ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
STEP_SLEEP = 0.3  # seconds added to each optimizer step of the run that is killed (see _kill)


def _env(extra=None):
    # One thread a process: the drills must be deterministic and share two cores with whatever else runs.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra or {})}


def _cmd(argv, nproc):
    if nproc > 1:
        return ["torchrun", "--standalone", "--nproc_per_node", str(nproc), "-m", "vltune", *argv]
    return [sys.executable, "-m", "vltune", *argv]


def _run(argv, nproc=1):
    proc = subprocess.run(_cmd(argv, nproc), capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _logged(out: Path) -> int:
    state_log = out / "train.log"
    return state_log.read_text(errors="replace").count("'loss'") if state_log.exists() else 0


def _torn(out: Path) -> Path | None:
    """A checkpoint whose data is written (trainer_state.json is among the last files) but not yet its marker."""
    for c in out.glob("checkpoint-*"):
        if (c / "trainer_state.json").exists() and not (c / MARKER).exists():
            return c
    return None


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun's workers run in sessions of their own: a process-group kill misses
    them), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill(argv, out: Path, nproc: int, at_step: int | None, during_save: bool, save_steps: int) -> dict:
    """Start the run, SIGKILL it (its own pid; under torchrun, the workers' pids first, then torchrun's) at `at_step`
    logged steps, or while a checkpoint is half-written; returns what was done.

    The killed run's optimizer steps each take STEP_SLEEP longer (VLTUNE_DRILL_STEP_SLEEP, slept before the
    optimizer step, so it changes no number): on a fast or crowded machine a tiny model's steps are quicker than
    this loop's polling, and the kill would land after the last step."""
    env = _env({"VLTUNE_DRILL_SAVE_SLEEP": "8"} if during_save else {"VLTUNE_DRILL_STEP_SLEEP": str(STEP_SLEEP)})
    proc = subprocess.Popen(_cmd(argv, nproc), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    t0, torn = time.time(), None
    try:
        while True:
            assert proc.poll() is None, f"the run ended before the kill: {proc.communicate()[1][-3000:]}"
            assert time.time() - t0 < 600, "the run never reached the kill point"
            if during_save:
                torn = _torn(out)
                if torn is not None and int(torn.name.split("-")[1]) > save_steps:
                    break
            elif _logged(out) >= at_step:
                time.sleep(random.uniform(0, 0.1))  # somewhere inside the next step
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            for pid in [*_descendants(proc.pid), proc.pid]:  # as a lost node: every process at once
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.communicate()
    return {"killed_after_step": _logged(out), "torn_checkpoint": torn.name if torn else None}


def _history(out: Path) -> dict[int, dict]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {h["step"]: h for h in state["log_history"] if "loss" in h}


def _weights(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


def drill(name: str, command: list[str], tmp_path: Path, weights: str, nproc: int = 1, steps: int = 40,
          save_steps: int = 5, during_save: bool = False, keys=("loss",)):
    """The whole drill; `command` is the vltune argv without --output_dir / --resume_from_checkpoint."""
    ref, out = tmp_path / "reference", tmp_path / "drilled"
    _run([*command, "--output_dir", str(ref)], nproc)
    at = random.Random(os.environ.get("VLTUNE_DRILL_SEED")).randint(save_steps + 1, steps - 2)
    done = _kill([*command, "--output_dir", str(out)], out, nproc, at, during_save, save_steps)
    complete = [c.step for c in list_checkpoints(out) if c.complete]
    resumed_from = complete[-1] if complete else 0
    _run([*command, "--output_dir", str(out), "--resume_from_checkpoint", "true"], nproc)

    a, b = _history(ref), _history(out)
    compared = [s for s in sorted(a) if s > resumed_from]
    diffs = [abs(a[s][k] - b[s][k]) for s in compared for k in keys if k in a[s] and s in b and k in b[s]]
    missing = [s for s in compared if s not in b]
    before = [abs(a[s]["loss"] - b[s]["loss"]) for s in sorted(a) if s <= resumed_from and s in b]
    wa, wb = _weights(ref / weights), _weights(out / weights)
    import torch

    same_weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    log = (out / "train.log").read_text(errors="replace")
    skipped_warning = done["torn_checkpoint"] is None or f"skipping {out / done['torn_checkpoint']}" in log
    record = {"drill": name, **done, "resumed_from": resumed_from, "steps_compared": len(compared),
              "max_abs_diff": max(diffs) if diffs else None,
              "max_abs_diff_before_kill": max(before) if before else None, "weights_equal": same_weights,
              "torn_skipped_with_warning": skipped_warning}
    record["held"] = bool(not missing and diffs and max(diffs) <= TOL and same_weights and skipped_warning
                          and resumed_from >= save_steps)
    if os.environ.get("VLTUNE_DRILL_REPORT"):
        with open(os.environ["VLTUNE_DRILL_REPORT"], "a") as f:
            f.write(json.dumps(record) + "\n")
    assert done["killed_after_step"] < steps, f"the kill landed after the last step: nothing was drilled {record}"
    assert resumed_from >= save_steps, record  # a complete checkpoint was there to resume from
    assert not missing, (missing, record)
    assert diffs and max(diffs) <= TOL, record
    assert same_weights, record
    assert skipped_warning, record


def sft_command(dataset, train_type, steps=40):
    return ["sft", "--dataset", dataset, "--train_type", train_type, "--max_steps", str(steps), "--seed", "11",
            "--learning_rate", "5e-3" if train_type == "lora" else "1e-3", "--lora_dropout", "0.1",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "steps",
            "--save_steps", "5", "--save_total_limit", "2", "--report_to", "none", "--gradient_checkpointing", "false"]


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_sft_killed_at_a_random_step_resumes_to_the_same_curve(train_type, tmp_path, grounding_jsonl):
    drill(f"sft {train_type}", sft_command(grounding_jsonl, train_type), tmp_path,
          "adapter_model.safetensors" if train_type == "lora" else "model.safetensors")


def test_sft_killed_during_a_checkpoint_save_resumes_from_the_one_before(tmp_path, grounding_jsonl):
    drill("sft lora, kill during save", sft_command(grounding_jsonl, "lora"), tmp_path, "adapter_model.safetensors",
          during_save=True)


def test_sft_torchrun_two_processes_killed_resumes_to_the_same_curve(tmp_path, tiny_path, grounding_jsonl):
    tiny_path("qwen3_vl")  # built once, before two ranks race to build it
    drill("sft lora, torchrun x2 (gloo)", [*sft_command(grounding_jsonl, "lora", steps=30),
                                           "--per_device_train_batch_size", "1"], tmp_path,
          "adapter_model.safetensors", nproc=2, steps=30)


def test_grpo_killed_at_a_random_step_resumes_to_the_same_curve(tmp_path, grounding_jsonl):
    drill("grpo lora", ["grpo", "--dataset", grounding_jsonl, "--train_type", "lora", "--num_iterations", "8",
                        "--seed", "11", "--per_device_train_batch_size", "4", "--num_generations", "2",
                        "--max_completion_length", "8", "--learning_rate", "5e-3", "--logging_steps", "1",
                        "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none",
                        "--gradient_checkpointing", "false", "--heldout_eval", "false"],
          tmp_path, "adapter_model.safetensors", steps=8, save_steps=2, keys=("loss", "reward"))


def test_vla_killed_at_a_random_step_resumes_to_the_same_curve(tmp_path):
    from vltune.vla.data.synthetic import make_dataset

    data = make_dataset(str(tmp_path / "syn"), fmt="calvin", n_train=16, n_val=0, state_dim=2)
    drill("vla (lstm head, image shifts)", ["vla", "--dataset", data, "--tiny_size", "xs", "--max_steps", "40",
                                            "--seed", "11", "--per_device_train_batch_size", "8", "--logging_steps",
                                            "1", "--image_size", "64", "--image_aug_shift", "4", "--save_strategy",
                                            "steps", "--save_steps", "5", "--save_top_k", "2", "--report_to", "none",
                                            "--val_episodes_ratio", "0"],
          tmp_path, "policy.safetensors")
