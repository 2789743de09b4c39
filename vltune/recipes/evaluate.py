"""`vltune eval <task>`: evaluation commands, one module per task (imported lazily)."""

from __future__ import annotations

import importlib

from ..errors import UsageError

TASKS = {
    "grounding": ("vltune.recipes.eval_grounding", "click accuracy of a model (+ adapters) on a grounding data set"),
    "vla": ("vltune.recipes.eval_vla", "closed-loop success of a VLA policy in Meta-World, rollout GIFs, step latency"),
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, TASKS))
        lines = "\n".join(f"  {k:<{width}}  {v[1]}" for k, v in TASKS.items())
        print(f"usage: vltune eval <task> [--help] [arguments]\n\ntasks:\n{lines}")
        return
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        raise UsageError(f"vltune eval: unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    importlib.import_module(TASKS[task][0]).main(rest)
