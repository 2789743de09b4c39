"""The reward registry: names -> reward functions, user plug-ins, and checked calls.

Two kinds of reward a user already writes are accepted, from a Python file given
with `--external_plugins my_rewards.py`:

- TRL functions: `def my_reward(prompts, completions, **kwargs) -> list[float]`. They get TRL's
  arguments unchanged (conversational completions are lists of messages; `completion_ids`,
  `trainer_state`, `log_extra`, `log_metric` and every data set column arrive in kwargs).
- ms-swift classes: `class MyReward: def __call__(self, completions, **kwargs) -> list[float]`,
  listed in a module-level dict `orms = {"my_reward": MyReward}` (ms-swift's convention) or found
  by class name. They are instantiated once (with `args=` the reward arguments if `__init__` takes
  `args`) and get completions as plain strings, like ms-swift passes them.

`@register_reward("name")` (from `vltune.rewards`) registers either kind under a name. Built-in
rewards are imported only when named, so diffusers stays optional.

Every call is checked: a reward that raises, returns the wrong number of values, or a value that
is not a number (or None = "not applicable") stops training with an error that names the reward,
the batch (step, size, first prompt) and the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError

logger = logging.getLogger("vltune")

# name -> "module:attribute", imported on first use
BUILTIN_REWARDS: dict[str, str] = {
    "click": "vltune.rewards.grounding:ClickReward",
    "iou": "vltune.rewards.grounding:IoUReward",
    "accuracy": "vltune.rewards.text:AccuracyReward",
    "format": "vltune.rewards.text:FormatReward",
    "length": "vltune.rewards.text:LengthReward",
    "clip_sd3": "vltune.rewards.clip_sd3:CLIPSD3Reward",
}
_REGISTERED: dict[str, Any] = {}  # filled by @register_reward and plug-in files' `orms` dicts


class RewardError(RuntimeError):
    """A reward function failed or broke the reward contract; the message names reward, batch and fix."""


# What each calling style passes (the README's "Your own reward" says the same).
RECEIVES = {
    "trl": "A TRL-signature function f(prompts, completions, **kwargs) receives TRL's arguments unchanged: with "
           "chat prompts, each completion is a list of messages [{'role': 'assistant', 'content': str}] (use "
           "completion[0]['content'], or vltune.rewards.completion_text(completion)); each prompt a list of messages.",
    "swift": "An ms-swift-style class's __call__(completions, **kwargs) receives each completion as a plain str.",
}


@dataclass
class RewardContext:
    """What built-in rewards need to know about the run.

    args: the reward arguments (vltune.recipes.grpo.RewardArguments or any object with those fields)
    processor: the VLM's processor (Qwen2.5-VL click coordinates depend on its resize)
    coords: the model family's click convention ("rel1000" | "abs_resized")
    output_dir: where rewards may write files (e.g. the clip_sd3 reward's images)
    """

    args: Any = None
    processor: Any = None
    coords: str = "rel1000"
    output_dir: str = "."
    extra: dict = field(default_factory=dict)


def register_reward(name: str) -> Callable:
    """Decorator: register a TRL-style function or an ms-swift-style class under `name`."""

    def wrap(obj):
        _REGISTERED[name] = obj
        return obj

    return wrap


def completion_text(completion: Any) -> str:
    """The text of one completion, whether TRL passes a string or a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion or []:
        content = message.get("content") if isinstance(message, dict) else message
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "".join(parts)


# ---------------------------------------------------------------- plug-ins
def load_external_plugins(paths: list[str]) -> list[Any]:
    """Import each plug-in file (or module name); register its `orms` dict entries. Returns the modules."""
    modules = []
    for i, spec in enumerate(paths or []):
        path = Path(spec).expanduser()
        if path.suffix == ".py" or path.exists():
            if not path.exists():
                raise UsageError(f"--external_plugins {spec}: no such file; give the path of your Python file of "
                                 f"reward functions")
            mod_name = f"vltune_plugin_{i}_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module  # picklable rewards and dataclasses in the plug-in need this
            module_spec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(spec)
            except ModuleNotFoundError as e:
                raise UsageError(f"--external_plugins {spec}: neither a file nor an importable module ({e}); give "
                                 f"the path of your Python file of reward functions") from None
        for name, obj in (getattr(module, "orms", None) or {}).items():
            _REGISTERED[name] = obj
        modules.append(module)
        logger.info("[rewards] loaded plug-in %s", spec)
    return modules


def resolve_reward(name: str, plugins: list[Any]) -> Any:
    """The function or class registered as `name` (plug-ins first, then built-ins, then plug-in attributes)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in BUILTIN_REWARDS:
        module, attr = BUILTIN_REWARDS[name].split(":")
        return getattr(importlib.import_module(module), attr)
    for module in plugins:
        obj = getattr(module, name, None)
        if callable(obj):
            return obj
    known = sorted(set(BUILTIN_REWARDS) | set(_REGISTERED))
    hint = (" (and the plug-in files' top-level functions/classes)" if plugins
            else "; a function of your own needs --external_plugins your_file.py")
    raise UsageError(f"--reward_funcs {name}: unknown reward; choose from {', '.join(known)}{hint}")


# ---------------------------------------------------------------- building checked callables
def _is_builtin(obj: Any) -> bool:
    return getattr(obj, "__module__", "").startswith("vltune.rewards.")


def instantiate(name: str, obj: Any, ctx: RewardContext) -> tuple[Callable, str]:
    """Turn a registry entry into a callable; return it and its calling style ("trl" or "swift")."""
    if inspect.isclass(obj):
        if _is_builtin(obj):
            return obj(ctx), "trl"
        params = inspect.signature(obj).parameters
        instance = obj(args=ctx.args) if "args" in params else obj()
        return instance, "swift"
    if callable(obj):
        return obj, "trl"
    raise TypeError(f"reward {name!r} is a {type(obj).__name__}, not a function or class")


def _describe_batch(prompts: list, kwargs: dict) -> str:
    state = kwargs.get("trainer_state")
    step = getattr(state, "global_step", None)
    first = completion_text(prompts[0]) if prompts else ""
    where = f"step {step}, " if step is not None else ""
    return f"{where}batch of {len(prompts)} completions, first prompt {first[-80:]!r}"


def checked(name: str, fn: Callable, style: str) -> Callable:
    """Wrap `fn` so that a failure or a broken contract raises RewardError naming reward, batch and fix."""

    warned: list = []  # the constant-value warning is given once per reward

    def reward(prompts, completions, **kwargs):
        call_completions = [completion_text(c) for c in completions] if style == "swift" else completions
        try:
            if style == "swift":
                values = fn(call_completions, prompts=prompts, **kwargs)
            else:
                values = fn(prompts=prompts, completions=call_completions, **kwargs)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(
                f"reward {name!r} raised {type(e).__name__}: {e}\n  on the {_describe_batch(prompts, kwargs)}.\n"
                f"  Fix the reward function (test it on this batch: it receives prompts, completions and the "
                f"columns {sorted(k for k in kwargs if k not in ('trainer_state', 'log_extra', 'log_metric'))}), "
                f"or remove it from --reward_funcs.") from e
        if values is None or not hasattr(values, "__len__"):
            raise RewardError(f"reward {name!r} returned {type(values).__name__} on the "
                              f"{_describe_batch(prompts, kwargs)}; return a list with one float per completion.")
        values = list(values)
        if len(values) != len(completions):
            raise RewardError(
                f"reward {name!r} returned {len(values)} values for the {_describe_batch(prompts, kwargs)}; "
                f"return exactly one float (or None where the reward does not apply) per completion, in order.")
        out = []
        for i, v in enumerate(values):
            if v is None:
                out.append(None)
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise RewardError(f"reward {name!r} returned {v!r} (a {type(v).__name__}) for completion {i} of the "
                                  f"{_describe_batch(prompts, kwargs)}; return floats (or None).") from None
            if math.isnan(f) or math.isinf(f):
                raise RewardError(f"reward {name!r} returned {f} for completion {i} of the "
                                  f"{_describe_batch(prompts, kwargs)}; return a finite float, or None to skip it.")
            out.append(f)
        if not warned and not _is_builtin(fn) and len(out) > 1 and len({v for v in out if v is not None}) == 1:
            warned.append(True)
            logger.warning(
                "[rewards] reward %r gave the same value %g to all %d completions (%s): if that is not intended, "
                "check what it receives. Completion 0 exactly as the reward received it: %r. %s",
                name, next(v for v in out if v is not None), len(out), _describe_batch(prompts, kwargs),
                call_completions[0], RECEIVES[style])
        return out

    reward.__name__ = name  # TRL logs rewards/<__name__>/mean
    reward.__qualname__ = name
    reward.reward_impl = fn
    return reward


def build_reward_funcs(names: list[str], ctx: RewardContext, plugins: list[str] | None = None,
                       resolved: list[tuple[str, Any]] | None = None) -> list[Callable]:
    """Checked reward callables for `names` (built-ins, registered names, or plug-in functions/classes);
    `resolved` = what `resolve_rewards` returned, if the recipe called it already."""
    resolved = resolve_rewards(names, plugins) if resolved is None else resolved
    return [checked(name, *instantiate(name, obj, ctx)) for name, obj in resolved]


def resolve_rewards(names: list[str], plugins: list[str] | None = None) -> list[tuple[str, Any]]:
    """(name, function or class) for each of `names`, plug-in files imported once: cheap, so a recipe calls it
    before loading any weights (an unknown name or a missing file is a UsageError)."""
    if not names:
        raise UsageError("--reward_funcs: no reward given; name one or more (e.g. click, iou, accuracy, format, "
                         "length, clip_sd3)")
    modules = load_external_plugins(plugins or [])
    return [(name, resolve_reward(name, modules)) for name in names]
