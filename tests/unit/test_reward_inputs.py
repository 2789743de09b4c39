"""A reward written for strings must not score 0 in silence: ms-swift-style classes get plain strings, and a
user reward that gives one value to a whole batch is warned about once, with a completion exactly as received."""

from __future__ import annotations

import logging

import pytest

from vltune.rewards.registry import RECEIVES, RewardContext, build_reward_funcs

PLUGIN = '''
def clicks(prompts, completions, **kwargs):
    """Written for strings: with TRL's conversational completions `"click(" in c` is always False."""
    return [float("click(" in c) for c in completions]

class SwiftClicks:
    def __call__(self, completions, **kwargs):
        assert all(isinstance(c, str) for c in completions), completions
        return [float("click(" in c) for c in completions]
'''


@pytest.fixture
def rewards(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(PLUGIN)
    return build_reward_funcs(["clicks", "SwiftClicks"], RewardContext(), [str(path)])


def _completions():
    return [[{"role": "assistant", "content": "click(10, 20)"}], [{"role": "assistant", "content": "no"}]]


def _prompts():
    return [[{"role": "user", "content": "Click it"}]] * 2


def test_constant_user_reward_is_warned_once_with_the_completion_as_received(rewards, caplog):
    clicks, _ = rewards
    logger = logging.getLogger("vltune")
    logger.addHandler(caplog.handler)
    try:
        assert clicks(prompts=_prompts(), completions=_completions()) == [0.0, 0.0]
        assert clicks(prompts=_prompts(), completions=_completions()) == [0.0, 0.0]
    finally:
        logger.removeHandler(caplog.handler)
    unique = {id(r): r for r in caplog.records}.values()  # a record may reach caplog twice (handler + propagation)
    warnings = [r.getMessage() for r in unique if "same value" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "[{'role': 'assistant', 'content': 'click(10, 20)'}]" in warnings[0]  # exactly as the reward got it
    assert "completion[0]['content']" in warnings[0] and "'clicks'" in warnings[0]


def test_ms_swift_classes_get_plain_strings_and_varied_rewards_are_not_warned(rewards, caplog):
    _, swift = rewards
    logger = logging.getLogger("vltune")
    logger.addHandler(caplog.handler)
    try:
        assert swift(prompts=_prompts(), completions=_completions()) == [1.0, 0.0]
    finally:
        logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "same value" in r.getMessage()]


def test_readme_documents_what_each_signature_receives():
    from pathlib import Path

    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text(encoding="utf-8")
    assert "[{'role': 'assistant', 'content': str}]" in readme and "plain `str`" in readme
    assert "list of messages" in RECEIVES["trl"] and "plain str" in RECEIVES["swift"]
