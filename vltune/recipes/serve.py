"""`vltune serve <what>`: serving commands (imported lazily). `vltune serve policy ...` serves a VLA policy."""

from __future__ import annotations

import importlib
import sys

TARGETS = {
    "policy": ("vltune.recipes.serve_policy", "a VLA policy to robots: OpenVLA-OFT's POST /act, sessions, msgpack"),
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, TARGETS))
        lines = "\n".join(f"  {k:<{width}}  {v[1]}" for k, v in TARGETS.items())
        print(f"usage: vltune serve <what> [--help] [arguments]\n\nwhat:\n{lines}")
        return
    if argv[0] not in TARGETS:
        print(f"vltune serve: unknown target {argv[0]!r}; this build serves: {', '.join(TARGETS)} "
              "(`vltune serve policy --policy DIR`)", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(TARGETS[argv[0]][0]).main(argv[1:])
