"""Reward functions for `vltune grpo`: built-ins by name, a user's file with --external_plugins.

    from vltune.rewards import register_reward

    @register_reward("my_reward")
    def my_reward(prompts, completions, **kwargs) -> list[float]: ...
"""

from .registry import RewardContext, RewardError, build_reward_funcs, completion_text, register_reward

__all__ = ["RewardContext", "RewardError", "build_reward_funcs", "completion_text", "register_reward"]
