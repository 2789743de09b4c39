"""A user's mistake gets ONE line on stderr naming the flag or file, what was wrong and the fix, and exit status
2 -- before any expensive work; tracebacks are for vltune's bugs (`VLTUNE_DEBUG=1` shows them for everything)."""

from __future__ import annotations

import json
import pickle

import pytest

# Imported at collection, not inside a test: some libraries they import (datasets, trl) give their loggers a
# handler bound to the sys.stderr of that moment, which inside a test is a capture that closes after it.
import vltune.recipes.grpo  # noqa: F401
import vltune.recipes.sft  # noqa: F401
import vltune.recipes.vla  # noqa: F401
from vltune.cli import main
from vltune.errors import UsageError

from tests.helpers import write_image, write_jsonl


@pytest.fixture
def no_weights(monkeypatch):
    """Fail loudly if a recipe gets as far as resolving or loading a model: flag values are checked before."""
    import vltune.models.load as load

    def refuse(*a, **k):
        raise AssertionError("the model was resolved before the flag values were checked")

    for name in ("resolve_model_path", "load_model", "load_processor"):
        monkeypatch.setattr(load, name, refuse)
    for mod in (vltune.recipes.sft, vltune.recipes.grpo, vltune.recipes.vla):
        for name in ("resolve_model_path", "load_model", "load_processor"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, refuse)


def _one_line(capsys, argv, *needles, exactly_one=True):
    status = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err
    assert "Traceback" not in err, err
    if exactly_one:
        assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


@pytest.mark.parametrize("argv, needles", [
    (["sft", "--train_type", "lorax"], ["--train_type", "lorax", "lora"]),
    (["sft", "--lora_rank", "-3"], ["--lora_rank -3", "positive"]),
    (["sft", "--lora_dropout", "1.5"], ["--lora_dropout 1.5"]),
    (["sft", "--model", "/nonexistent/dir"], ["--model /nonexistent/dir", "no such directory", "network"]),
    (["sft", "--lora_ran", "8"], ["--lora_ran", "did you mean --lora_rank"]),
    (["sft", "--loss_scale", "last"], ["--loss_scale", "last_round"]),
    (["sft", "--config", "/nonexistent.yaml"], ["--config /nonexistent.yaml", "no such file"]),
    (["sft", "--resume_from_checkpoint", "/nonexistent/checkpoint-3"], ["--resume_from_checkpoint", "no such"]),
    (["vla", "--train_type", "lorax"], ["--train_type", "frozen"]),
    (["vla", "--action_head", "foo"], ["--action_head", "lstm"]),
    (["sft", "--max_pixels", "-1"], ["--max_pixels -1", "positive"]),
    (["personalize", "--image_cache_mb", "-5"], ["--image_cache_mb -5", "0 or more", "off"]),
    (["grpo", "--external_plugins", "/nonexistent/my_rewards.py", "--reward_funcs", "mine"],
     ["--external_plugins /nonexistent/my_rewards.py", "no such file"]),
    (["data", "synth"], ["vltune data synth gui"]),
    (["data", "chek"], ["vltune data: unknown sub-command 'chek'", "check"]),
    (["eval", "groundng"], ["vltune eval: unknown task 'groundng'", "grounding"]),
    (["export", "--output_dir", "/tmp/x"], ["vltune export", "--merge_lora", "--deepspeed_to_fp32"]),
    (["infer", "--users", "x"], ["--users"]),
    (["infer", "--image", "/nonexistent/screen.png", "--prompt", "Tap settings"], ["--image", "no such file"]),
])
def test_bad_flag_value_is_one_line_before_any_loading(argv, needles, capsys, no_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that gets as far as its default --output_dir writes it here
    _one_line(capsys, argv, *needles)


@pytest.mark.parametrize("spec", ["abc", "3-", "3..6", "6-3", "1,,x"])
def test_bad_users_spec_is_one_line(spec, tmp_path, capsys, no_weights):
    data = write_jsonl(tmp_path / "d.jsonl", [])
    line = _one_line(capsys, ["sft", "--dataset", data, "--users", spec], "--users")
    assert "11-83" in line or "3-6" in line  # says how to write it


def test_unknown_reward_name_is_one_line_before_the_model(capsys, no_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line(capsys, ["grpo", "--reward_funcs", "clik", "--output_dir", str(tmp_path / "o")],
              "--reward_funcs clik", "click")


@pytest.mark.parametrize("argv, needles", [
    (["sft", "--dataset", "/nonexistent.jsonl"], ["/nonexistent.jsonl", "no such file", "--dataset"]),
    (["vla", "--dataset", "data/nope"], ["--dataset data/nope", "does not exist"]),
    (["data", "check", "--dataset", "/nonexistent.jsonl"], ["/nonexistent.jsonl", "no such file"]),
])
def test_missing_data_is_one_line_before_the_weights(argv, needles, capsys, tmp_path, monkeypatch):
    """Data is read after the processor, before any weight: a missing path is one line."""
    import vltune.models.load as load

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("weights loaded before the data was read"))
    monkeypatch.setattr(vltune.recipes.vla, "build_backbone", lambda *a, **k: pytest.fail("backbone built first"))
    _one_line(capsys, argv, *needles, exactly_one=False)


def test_eval_vla_without_a_policy_is_one_line_and_writes_nothing(tmp_path, capsys):
    _one_line(capsys, ["eval", "vla", "--policy", str(tmp_path / "nope")], "--policy", "policy_config.json",
              "--policy_server")
    assert list(tmp_path.iterdir()) == []


def test_pickle_dir_without_allow_pickle(tmp_path, capsys):
    d = tmp_path / "users"
    d.mkdir()
    (d / "user_1.pkl").write_bytes(pickle.dumps([]))
    _one_line(capsys, ["sft", "--dataset", str(d), "--output_dir", str(tmp_path / "o")], str(d),
              "--allow_pickle true", exactly_one=False)


def _user_rows(tmp_path, users):
    img = write_image(tmp_path / "a.png")
    return write_jsonl(tmp_path / "users.jsonl", [
        {"messages": [{"role": "user", "content": "<image>Open it"}, {"role": "assistant", "content": "click(1, 2)"}],
         "images": [img], "user": u} for u in users])


@pytest.mark.parametrize("spec", ["11-83", "7"])
def test_users_matching_no_user_say_which_exist(spec, tmp_path, capsys):
    data = _user_rows(tmp_path, [1, 2, 3, 5, 6])
    line = _one_line(capsys, ["sft", "--dataset", data, "--users", spec, "--output_dir", str(tmp_path / "o")],
                     f"--users {spec}", "1-3,5-6", exactly_one=False)
    assert "matches no user" in line


def test_users_without_a_dataset(tmp_path, capsys):
    _one_line(capsys, ["sft", "--users", "1-3", "--output_dir", str(tmp_path / "o")], "--users 1-3", "no --dataset",
              exactly_one=False)


def test_users_on_data_without_a_user_column(tmp_path, capsys, grounding_jsonl):
    _one_line(capsys, ["sft", "--dataset", grounding_jsonl, "--users", "1-3", "--output_dir", str(tmp_path / "o")],
              "no 'user' column", exactly_one=False)


def test_strict_with_a_bad_sample_is_one_line(tmp_path, capsys):
    img = write_image(tmp_path / "a.png")
    good = {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "ok"}],
            "images": [img]}
    bad = {"messages": [{"role": "user", "content": "<image><image>Hi"}, {"role": "assistant", "content": "ok"}],
           "images": [img]}
    data = write_jsonl(tmp_path / "d.jsonl", [good, bad])
    line = _one_line(capsys, ["sft", "--dataset", data, "--strict", "true", "--output_dir", str(tmp_path / "o")],
                     "--strict true", "d.jsonl:2", exactly_one=False)
    assert "drop --strict" in line


def test_invalid_json_message_reads_well(tmp_path):
    from vltune.data.formats import read_dataset

    data = write_jsonl(tmp_path / "d.jsonl", ["{not json"])
    _, errors = read_dataset(data)
    assert "at at" not in str(errors[0]) and "column 2" in str(errors[0])


def test_vltune_debug_shows_the_traceback(capsys, monkeypatch, no_weights):
    monkeypatch.setenv("VLTUNE_DEBUG", "1")
    assert main(["sft", "--lora_rank", "-3"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UsageError" in err and err.strip().splitlines()[-1].startswith("vltune sft:")


def test_library_code_says_a_mistake_one_way():
    """Every user-facing mistake is a UsageError (one line, exit 2, traceback under VLTUNE_DEBUG=1): no module
    prints its own message and raises SystemExit, which would bypass VLTUNE_DEBUG and the one-line format."""
    import re
    from pathlib import Path

    import vltune

    offenders = [f"{p.name}:{n}" for p in Path(vltune.__file__).parent.rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bSystemExit\(", line)]
    assert offenders == [], offenders


def test_data_errors_are_usage_errors():
    from vltune.data.errors import DataError

    assert issubclass(DataError, UsageError) and issubclass(DataError, ValueError)


def test_console_script_exits_2(tmp_path):
    """The installed entry point (not only main()) returns status 2 with one line."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vltune", "sft", "--lora_rank", "0"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--lora_rank 0" in r.stderr, r.stderr


def test_args_json_carries_no_run_state_and_resume_is_logged(tmp_path, capsys):
    """args.json is reusable with --config: a run from it starts fresh (no resume_from_checkpoint, no old
    logging_dir); a run that does resume says from where."""
    import logging

    from vltune.args import SFTTrainingArguments, dump_config
    from vltune.checkpoints import mark_complete
    from vltune.resume import resume_checkpoint

    ckpt = tmp_path / "run" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    mark_complete(str(ckpt), 3)
    args = SFTTrainingArguments(output_dir=str(tmp_path / "run"), resume_from_checkpoint=str(ckpt), use_cpu=True)
    dump_config((args,), tmp_path / "args.json")
    saved = json.loads((tmp_path / "args.json").read_text())
    assert "resume_from_checkpoint" not in saved and "logging_dir" not in saved
    assert saved["output_dir"] == str(tmp_path / "run")  # the arguments themselves are kept

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("vltune")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        assert resume_checkpoint("true", str(tmp_path / "run")) == str(ckpt)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert any(str(ckpt) in r.getMessage() and "global step 3" in r.getMessage() for r in records)
    with pytest.raises(UsageError, match="no checkpoint-N directory"):
        resume_checkpoint(True, str(tmp_path / "empty"))
