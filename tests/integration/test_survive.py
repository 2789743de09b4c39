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
    err = capsys.readouterr().err.strip().splitlines()[-1]
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
    (tmp_path / ("personalize.json" if command == "personalize" else "args.json")).write_text("{}")
    extra = ["--dataset", str(tmp_path / "x.jsonl")] if command == "personalize" else []
    assert cli_main([command, "--output_dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert "holds a previous run" in err and "--overwrite_output_dir true" in err, err


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path):
    """The user's own files in the directory (here: the data) survive --overwrite_output_dir."""
    from vltune.train.run import claim_output_dir

    fake_checkpoint(tmp_path, 5, complete=True)
    for name in ("train.log", "args.json", "metrics.csv", "mydata.jsonl"):
        (tmp_path / name).write_text("x")
    (tmp_path / "runs").mkdir()
    claim_output_dir(tmp_path, None, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata.jsonl"]
    claim_output_dir(tmp_path, None, overwrite=False)  # nothing of a run left: accepted
