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

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


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
