"""`vltune <command> --help` works for every command and sub-command, help texts hold no measured figures, and
no command accepts an abbreviated flag."""

from __future__ import annotations

import re

import pytest

from vltune.cli import COMMANDS, main
from vltune.recipes.data import SUBCOMMANDS as DATA_SUBCOMMANDS
from vltune.recipes.evaluate import TASKS as EVAL_TASKS

# every command line that has a --help: commands, their sub-commands, and `data synth gui`
COMMAND_LINES = ([[c] for c in COMMANDS if c not in ("data", "eval")]
                 + [["data"]] + [["data", s] for s in DATA_SUBCOMMANDS] + [["data", "synth", "gui"]]
                 + [["eval"]] + [["eval", t] for t in EVAL_TASKS])
# Parsers of these commands list arguments (the others are menus of sub-commands).
PARSERS = [c for c in COMMAND_LINES if c not in (["data"], ["eval"], ["data", "synth"])]
FIGURE = re.compile(r"\d%|\b\d+ of \d+ seeds|\bmeasured\b[^.]*\d|\d(\.\d+)?x (faster|slower)")


def _help(capsys, argv: list[str]) -> str:
    try:
        status = main([*argv, "--help"])
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    assert status in (0, None), f"vltune {' '.join(argv)} --help exited {status}: {err[-2000:]}"
    assert "Traceback" not in err, err
    return out


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=" ".join)
def test_help_works(argv, capsys):
    out = _help(capsys, argv)
    assert "usage: vltune" in out


@pytest.mark.parametrize("argv", PARSERS, ids=" ".join)
def test_help_lists_arguments(argv, capsys):
    assert "--config" in _help(capsys, argv)  # the argument list, not only the usage line


@pytest.mark.parametrize("command", [c[0] for c in PARSERS if len(c) == 1])
def test_help_shows_the_docstring_as_written(command, capsys):
    """The command's docstring is its --help description, line for line: example command lines (and their
    backslash continuations) are not reflowed into one paragraph."""
    import importlib

    out = _help(capsys, [command]).splitlines()
    doc = importlib.import_module(COMMANDS[command][0]).__doc__ or ""
    examples = [line for line in doc.splitlines() if line.startswith(f"    vltune {command} ")]
    if not examples:
        pytest.skip(f"vltune {command}'s docstring has no example command line")
    for line in examples:
        assert line in out, f"vltune {command} --help reflowed the example {line!r}"


def _vltune_help_texts() -> dict[str, str]:
    """The help text of every argument vltune itself defines (transformers' own are not ours to edit)."""
    import dataclasses
    import importlib
    import pkgutil

    import vltune

    texts = {}
    for info in pkgutil.walk_packages(vltune.__path__, "vltune."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__.startswith("vltune"):
                own = obj.__dict__.get("__annotations__", {})
                for f in dataclasses.fields(obj):
                    if f.name in own and "help" in f.metadata:
                        texts[f"{obj.__module__}.{obj.__name__}.{f.name}"] = f.metadata["help"]
    return texts


def test_help_texts_hold_no_measured_figures():
    texts = _vltune_help_texts()
    assert len(texts) > 100
    bad = {k: v for k, v in texts.items() if FIGURE.search(v)}
    assert not bad, f"measured figures belong in the README or benchmarks/LOG.md, not in --help: {bad}"


@pytest.mark.parametrize("argv", PARSERS, ids=" ".join)
def test_no_abbreviated_flags(argv, capsys):
    """`--confi x` must not be read as `--config x` (argparse prefix matching is off for every command)."""
    status = main([*argv, "--confi", "nope.yaml"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and "unrecognised arguments: --confi" in err and "--config" in err, err


def test_sft_help_lists_the_flags_users_look_for(capsys):
    out = _help(capsys, ["sft"])
    for flag in ("--train_type", "--lora_rank", "--freeze_vit", "--max_pixels", "--loss_scale", "--strict",
                 "--resume_from_checkpoint", "--gradient_checkpointing"):
        assert flag in out, flag
