"""Runs that survive (issue 16): complete checkpoints only, a full disk, reused output directories, preemption,
non-finite losses. The kill -9 drills are in test_drills.py (marker `drills`)."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest

from vltune.checkpoints import MARKER, is_complete, list_checkpoints, mark_complete
from vltune.cli import main as cli_main
from vltune.errors import RunStopped, UsageError
from vltune.resume import resume_checkpoint


def sft_argv(out, dataset, *extra, steps=6):
    return ["sft", "--output_dir", str(out), "--dataset", dataset, "--train_type", "lora", "--max_steps", str(steps),
            "--report_to", "none", "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--gradient_checkpointing", "false", "--save_strategy", "steps", "--save_steps", "2", "--seed", "3", *extra]


def fake_checkpoint(run: Path, step: int, complete: bool) -> Path:
    ckpt = run / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (ckpt / "model.safetensors").write_bytes(b"x" * 10)
    if complete:
        mark_complete(str(ckpt), step)
    return ckpt


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def vltune_log():
    log = logging.getLogger("vltune")
    handler, level = Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler.lines
    log.removeHandler(handler)
    log.setLevel(level)


# ---------------------------------------------------------------------------- which checkpoint counts
def test_resume_true_takes_the_newest_complete_checkpoint_and_names_the_incomplete_ones(tmp_path, vltune_log):
    run = tmp_path / "run"
    fake_checkpoint(run, 2, complete=True)
    good = fake_checkpoint(run, 4, complete=True)
    torn = fake_checkpoint(run, 6, complete=False)
    assert resume_checkpoint("true", str(run)) == str(good)
    assert any(str(torn) in line and "incomplete" in line for line in vltune_log), vltune_log
    with pytest.raises(UsageError, match="incomplete checkpoint"):
        resume_checkpoint(str(torn), str(run))


def test_a_marked_checkpoint_whose_file_changed_size_is_incomplete(tmp_path):
    """A marker alone is not enough: a file truncated after the save (or a marker copied along) is caught."""
    ckpt = fake_checkpoint(tmp_path, 3, complete=True)
    assert is_complete(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"x" * 4)
    assert not is_complete(ckpt)
    with pytest.raises(UsageError, match="only incomplete checkpoints"):
        resume_checkpoint(True, str(tmp_path))


def test_checkpoints_are_marked_complete_and_a_torn_one_is_skipped_then_replaced(tmp_path, grounding_jsonl,
                                                                                 vltune_log):
    """save_total_limit 2 over 6 steps saved every 2: checkpoint-4 and -6 stay, each with its marker. Then
    checkpoint-6 is made what a kill during its save leaves (no marker, a stray file): --resume_from_checkpoint
    true resumes from checkpoint-4 naming checkpoint-6 as skipped, and re-saves checkpoint-6 whole."""
    from vltune.checkpoints import unmark

    out = tmp_path / "run"
    assert cli_main(sft_argv(out, grounding_jsonl, "--save_total_limit", "2")) == 0
    assert [(c.step, c.complete) for c in list_checkpoints(out)] == [(4, True), (6, True)]
    marker = json.loads((out / "checkpoint-6" / MARKER).read_text())
    assert marker["global_step"] == 6 and {"trainer_state.json", "optimizer.pt", "rng_state.pth"} <= set(marker["files"])

    unmark(str(out / "checkpoint-6"))
    (out / "checkpoint-6" / "junk.bin").write_bytes(b"left by a killed run")
    assert cli_main(sft_argv(out, grounding_jsonl, "--save_total_limit", "2", "--resume_from_checkpoint", "true")) == 0
    assert any("skipping" in line and str(out / "checkpoint-6") in line for line in vltune_log)
    assert any("resuming from" in line and str(out / "checkpoint-4") in line for line in vltune_log)
    assert [(c.step, c.complete) for c in list_checkpoints(out)] == [(4, True), (6, True)]
    assert not (out / "checkpoint-6" / "junk.bin").exists()


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_how_to_go_on(tmp_path, grounding_jsonl, monkeypatch,
                                                                         capsys):
    """ENOSPC while writing checkpoint-4's optimizer state (simulated): checkpoint-4 is removed, checkpoint-2 is
    intact and complete, and the run stops with status 74 and one line naming the disk and the checkpoint."""
    import torch

    real_save = torch.save

    def save(obj, f, *a, **kw):
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    status = cli_main(sft_argv(out, grounding_jsonl))
    err = _said(capsys.readouterr().err)
    assert status == RunStopped.DISK_FULL
    assert [(c.step, c.complete) for c in list_checkpoints(out)] == [(2, True)]
    assert f"the disk holding {out} is full" in err and str(out / "checkpoint-2") in err, err
    assert err.endswith("--resume_from_checkpoint true"), err


# ---------------------------------------------------------------------------- reused output directories
def test_a_second_run_into_the_same_directory_is_refused_unless_told(tmp_path, grounding_jsonl, capsys):
    """The first run's train.log and checkpoints stay as they were; --overwrite_output_dir true replaces them."""
    out = tmp_path / "run"
    assert cli_main(sft_argv(out, grounding_jsonl, steps=2)) == 0
    log_before = (out / "train.log").read_text()
    capsys.readouterr()
    assert cli_main(sft_argv(out, grounding_jsonl, steps=2)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(out) in err, err
    for option in ("--resume_from_checkpoint true", "--overwrite_output_dir true", "new --output_dir"):
        assert option in err, err
    assert (out / "train.log").read_text() == log_before

    (out / "checkpoint-2" / "stale.bin").write_bytes(b"first run")
    assert cli_main(sft_argv(out, grounding_jsonl, "--overwrite_output_dir", "true", steps=2)) == 0
    assert not (out / "checkpoint-2" / "stale.bin").exists()
    assert (out / "train.log").read_text().count("[preflight]") == 1, "train.log holds one run, not two"


@pytest.mark.parametrize("command", ["grpo", "vla", "personalize"])
def test_every_command_that_writes_a_run_refuses_a_previous_one(command, tmp_path, capsys):
    """Checked before anything is loaded: the refusal costs nothing."""
    (tmp_path / ("personalize.json" if command == "personalize" else "trainer_state.json")).write_text("{}")
    extra = ["--dataset", str(tmp_path / "x.jsonl")] if command == "personalize" else []
    assert cli_main([command, "--output_dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert "holds a previous run" in err and "--overwrite_output_dir true" in err, err


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path):
    """The user's own files in the directory (here: the data) survive --overwrite_output_dir."""
    from vltune.train.run import claim_output_dir

    fake_checkpoint(tmp_path, 5, complete=True)
    for name in ("train.log", "args.json", "trainer_state.json", "metrics.csv", "mydata.jsonl"):
        (tmp_path / name).write_text("x")
    (tmp_path / "runs").mkdir()
    claim_output_dir(tmp_path, None, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata.jsonl"]
    claim_output_dir(tmp_path, None, overwrite=False)  # nothing of a run left: accepted
    (tmp_path / "args.json").write_text("{}")  # an attempt that stopped before training (a wrong --dataset) ...
    (tmp_path / "train.log").write_text("x")
    claim_output_dir(tmp_path, None, overwrite=False)  # ... is no previous run: running again after the fix works


# ---------------------------------------------------------------------------- preemption
def _start(argv, env_extra=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "vltune", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for(predicate, proc, timeout=240):
    import time

    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.communicate()[1][-3000:]}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.2)


def _said(err: str) -> str:
    """vltune's last line on stderr (a progress bar may be redrawn after it as the process exits)."""
    return [line for line in err.splitlines() if line.startswith("vltune ")][-1]  # on a line of its own


def _logged_steps(out: Path) -> int:
    log = out / "train.log"
    return log.read_text().count("'loss'") if log.exists() else 0


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_or_one_ctrl_c_saves_at_the_end_of_the_step_and_says_how_to_resume(sig, tmp_path, grounding_jsonl):
    import signal

    out = tmp_path / "run"
    proc = _start(sft_argv(out, grounding_jsonl, "--save_strategy", "no", steps=500))
    _wait_for(lambda: _logged_steps(out) >= 2, proc)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=240)
    line = _said(err)
    assert proc.returncode == (RunStopped.PREEMPTED if sig == "SIGTERM" else RunStopped.INTERRUPTED), err[-3000:]
    (ckpt,) = list_checkpoints(out)  # saved although --save_strategy no
    assert ckpt.complete and f"stopped at step {ckpt.step}, checkpoint at {ckpt.path}" in line, line
    assert "resume with: vltune sft " in line and line.endswith("--resume_from_checkpoint true"), line
    assert 2 <= ckpt.step < 500


def test_a_second_ctrl_c_stops_at_once_and_its_checkpoint_does_not_count(tmp_path, grounding_jsonl):
    """The first Ctrl-C starts the save (made slow by the drill hook); the second one ends the run there: what
    it leaves has no marker, so --resume_from_checkpoint true would not take it."""
    import signal
    import time

    out = tmp_path / "run"
    proc = _start(sft_argv(out, grounding_jsonl, "--save_strategy", "no", steps=500),
                  {"VLTUNE_DRILL_SAVE_SLEEP": "60"})
    _wait_for(lambda: _logged_steps(out) >= 1, proc)
    proc.send_signal(signal.SIGINT)
    _wait_for(lambda: any((c / "trainer_state.json").exists() for c in out.glob("checkpoint-*")), proc)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == RunStopped.INTERRUPTED and time.time() - t0 < 30, err[-3000:]
    assert "second Ctrl-C" in _said(err)
    assert [c.complete for c in list_checkpoints(out)] == [False]


def test_signal_handlers_are_given_back():
    import signal

    from vltune.train.survive import Preemption

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with Preemption():
        assert signal.getsignal(signal.SIGTERM) != before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ---------------------------------------------------------------------------- non-finite losses
@pytest.fixture
def poisoned(grounding_jsonl, monkeypatch):
    """Line 5 of the data is a poisoned sample: any batch holding it gets a NaN loss. It is recognised by its id
    as the batch carries it (data file -> collator -> trainer), so the test also checks that the ids arrive."""
    import transformers

    import vltune.train.survive as survive

    bad = f"{grounding_jsonl}:5"
    hit = {"now": False, "steps": []}
    real_ids, real_loss = survive._sample_ids, transformers.Trainer.compute_loss

    def ids(inputs):
        got = real_ids(inputs)
        hit["now"] = bad in got
        return got

    def compute_loss(self, model, inputs, *a, **kw):
        loss = real_loss(self, model, inputs, *a, **kw)
        if hit["now"]:
            hit["steps"].append(self.state.global_step + 1)
            return loss * float("nan")
        return loss

    monkeypatch.setattr(survive, "_sample_ids", ids)
    monkeypatch.setattr(transformers.Trainer, "compute_loss", compute_loss)
    return bad, hit


def test_a_nan_loss_stops_naming_the_step_and_the_samples(tmp_path, grounding_jsonl, poisoned, capsys):
    bad, hit = poisoned
    out = tmp_path / "run"
    status = cli_main(sft_argv(out, grounding_jsonl, "--num_samples", "8", "--save_steps", "1", "--save_total_limit", "10", steps=4))
    err = _said(capsys.readouterr().err)
    assert status == RunStopped.NONFINITE, err
    step = hit["steps"][0]
    assert f"non-finite loss (nan) at step {step}" in err and bad in err, err
    ckpts = list_checkpoints(out)
    assert [c.step for c in ckpts] == list(range(1, step)) and all(c.complete for c in ckpts)
    assert (f"the last complete checkpoint is {out / f'checkpoint-{step - 1}'}" if step > 1
            else "no checkpoint was saved yet") in err


def test_nonfinite_skip_leaves_the_weights_untouched_for_that_step_and_counts_it(tmp_path, grounding_jsonl, poisoned):
    from safetensors.torch import load_file

    bad, hit = poisoned
    out = tmp_path / "run"
    assert cli_main(sft_argv(out, grounding_jsonl, "--num_samples", "8", "--save_steps", "1", "--save_total_limit", "10", "--nonfinite", "skip",
                             "--max_nonfinite_steps", "1", steps=4)) == 0
    (step,) = hit["steps"]
    assert json.loads((out / "train_results.json").read_text())["nonfinite_steps_skipped"] == 1
    assert "1 step(s) with a non-finite loss" in (out / "train.log").read_text()
    after = load_file(out / f"checkpoint-{step}" / "adapter_model.safetensors")
    if step > 1:
        before = load_file(out / f"checkpoint-{step - 1}" / "adapter_model.safetensors")
        assert all(bool((before[k] == after[k]).all()) for k in after), "the skipped step changed the weights"
    nxt = load_file(out / f"checkpoint-{min(step + 1, 4)}" / "adapter_model.safetensors")
    assert step == 4 or any(not bool((nxt[k] == after[k]).all()) for k in after), "training went on after it"
