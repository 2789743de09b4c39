"""Shared fixtures: embedded tiny models (built once per session, offline) and small data sets. Plain helper
functions live in tests/helpers.py (import them from there, never from this file)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory):
    if "VLTUNE_CACHE" not in os.environ:
        os.environ["VLTUNE_CACHE"] = str(tmp_path_factory.mktemp("vltune_cache"))
    import torch

    from vltune.console import setup_logging

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    setup_logging()  # the one process-wide handler exists before the first test, so no test "adds" it
    yield


# ---------------------------------------------------------------------------- no test leaks global state
# Variables that libraries legitimately set once per process (never read back by vltune to decide anything).
_ENV_SET_BY_LIBRARIES = {
    "TOKENIZERS_PARALLELISM",  # vltune.console.setup_logging (setdefault, before any fork)
    "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK",  # torch / OpenMP at first use
    "CUDA_MODULE_LOADING",  # torch at first CUDA query
    "TORCHINDUCTOR_CACHE_DIR",  # torch._inductor, the first time something in the process imports it
    "PYTORCH_NVML_BASED_CUDA_CHECK",  # deepspeed, when it is first imported (only where it is installed)
    "PYTEST_CURRENT_TEST",  # pytest's own, per phase
}


def _ours(handler) -> bool:
    """pytest adds and removes its own capture handlers around every phase: those are not a test's doing."""
    return not type(handler).__module__.startswith("_pytest")


def _global_state() -> dict:
    import logging
    import sys

    import torch

    try:
        from transformers.integrations import deepspeed as hf_deepspeed

        ref = hf_deepspeed._hf_deepspeed_config_weak_ref
        ds_config = None if ref is None else ref()
    except ImportError:
        ds_config = None
    loggers = {name: logging.getLogger(name) for name in ("", "vltune", "transformers", "peft", "trl")}
    return {
        "sys.stdout": sys.stdout,
        "sys.stderr": sys.stderr,
        "os.environ": {k: v for k, v in os.environ.items() if k not in _ENV_SET_BY_LIBRARIES},
        "torch threads": torch.get_num_threads(),
        "torch default dtype": torch.get_default_dtype(),
        "transformers' DeepSpeed config (HfTrainerDeepSpeedConfig weak reference)": ds_config,
        "logging handlers": {n: [h for h in lg.handlers if _ours(h)] for n, lg in loggers.items()},
        "logging handler streams": {n: [getattr(h, "stream", None) for h in lg.handlers if _ours(h)]
                                    for n, lg in loggers.items()},
        "vltune logger level": loggers["vltune"].level,
    }


def _describe(name: str, before, after) -> str:
    if name == "os.environ":
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
        parts = [f"{label} {', '.join(keys)}" for label, keys in
                 (("set", added), ("removed", removed), ("changed", changed)) if keys]
        return f"os.environ ({'; '.join(parts)})"
    return f"{name} ({before!r} -> {after!r})"


@pytest.fixture(autouse=True)
def _no_leaked_global_state(request):
    """Fail the test that leaves process-wide state changed: the next test would inherit it (issue 11)."""
    before = _global_state()
    yield
    after = _global_state()
    leaked = [_describe(k, before[k], after[k]) for k in before if before[k] != after[k]]
    if leaked:
        pytest.fail(f"{request.node.nodeid} left global state changed: {'; '.join(leaked)}. Restore it "
                    "(use monkeypatch, or undo it in a finally block).", pytrace=False)


@pytest.fixture(scope="session")
def tiny_path():
    from vltune.models.tiny import tiny_model_path

    return lambda family="qwen3_vl": tiny_model_path(family, "xs")


@pytest.fixture(scope="session")
def processor_for():
    from vltune.models.load import load_processor
    from vltune.models.tiny import tiny_model_path

    cache = {}

    def get(family="qwen3_vl"):
        if family not in cache:
            cache[family] = load_processor(tiny_model_path(family, "xs"))
        return cache[family]

    return get


@pytest.fixture
def grounding_jsonl(tmp_path):
    """A small learnable grounding set (the demo's generator) as ms-swift JSONL."""
    from vltune.data.synthetic import make_grounding_set

    made = make_grounding_set(tmp_path / "g", n_train=32, n_test=8, seed=0)
    return made["train"]
