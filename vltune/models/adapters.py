"""A global model loaded once, and per-user LoRA adapters switched on it (seeds/04's personalisation).

- `load_global(model_args, base)`: the global model of `vltune sft` -- a full-weights directory, or a
  LoRA adapter directory, which is merged into its base in memory so per-user adapters stack on it.
- `UserAdapters`: finds `user_<id>/` adapter directories (what `vltune personalize` writes), loads each
  once onto the one loaded global model, and activates one user at a time; users without an adapter
  get the global model.
- `zero_shot_model_of(base)`: the model the global one was fine-tuned from (for zero-shot rows).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import replace
from pathlib import Path

from ..errors import UsageError
from .config import ModelArguments
from .load import base_of_adapter

logger = logging.getLogger("vltune")

USER_DIR = re.compile(r"^user_(\d+)$")


def load_global(model_args: ModelArguments, base: str | None):
    """(model in eval mode, processor, description) for the global model `base` (full dir or LoRA adapter dir;
    None: --model / the embedded tiny model). A LoRA global is merged into its base weights in memory."""
    from .inference import load_for_inference

    if base and base_of_adapter(base):
        model, processor, path = load_for_inference(replace(model_args, model=base_of_adapter(base)), base)
        model = model.merge_and_unload()
        logger.info("[model] global model: LoRA adapter %s merged into %s (in memory)", base, path)
        return model, processor, f"{path} + {base}"
    model, processor, path = load_for_inference(replace(model_args, model=base or model_args.model))
    return model, processor, path


def zero_shot_model_of(base: str) -> str:
    """The model `base` (a vltune sft output) was fine-tuned from: the adapter's base, or --model of its args.json."""
    from .tiny import tiny_model_path

    if base_of_adapter(base):
        return base_of_adapter(base)
    args_file = Path(base) / "args.json"
    if not args_file.is_file():
        raise UsageError(f"--zero_shot auto: {base} has no args.json (not a vltune sft output); give the "
                         f"pre-trained model's path or hub id instead")
    args = json.loads(args_file.read_text())
    return args.get("model") or tiny_model_path(args.get("model_family", "qwen3_vl"), args.get("tiny_size", "s"))


def find_user_adapters(directory: str | Path) -> dict[int, Path]:
    """{user id: adapter dir} for every `user_<id>/adapter_config.json` under `directory` (or its adapters/)."""
    root = Path(directory)
    if (root / "adapters").is_dir():
        root = root / "adapters"
    found = {int(m.group(1)): p for p in sorted(root.iterdir()) if p.is_dir() and (m := USER_DIR.match(p.name))
             and (p / "adapter_config.json").is_file()} if root.is_dir() else {}
    # a `vltune personalize` output whose guard kept every user on the global model has no adapter: that is a
    # result, not a mistake
    if not found and not (Path(directory) / "personalize.json").is_file():
        raise UsageError(f"--per_user_adapters {directory}: no user_<id>/adapter_config.json found there "
                         f"(give the --output_dir of `vltune personalize`)")
    return found


class UserAdapters:
    """Per-user LoRA adapters on one loaded model: `with bank.use(user): model.generate(...)`.

    Adapters are loaded lazily the first time their user comes up and kept (a LoRA adapter is a few MB);
    the global weights are never reloaded or copied.
    """

    def __init__(self, model, directory: str | Path):
        self.paths = find_user_adapters(directory)
        self.base = model
        self.model = model  # becomes a PeftModel with the first adapter
        self.loaded: set[int] = set()

    @property
    def users(self) -> list[int]:
        return sorted(self.paths)

    def _load(self, user: int) -> None:
        from peft import PeftModel

        name = f"user_{user}"
        if not self.loaded:
            self.model = PeftModel.from_pretrained(self.base, str(self.paths[user]), adapter_name=name)
        else:
            self.model.load_adapter(str(self.paths[user]), adapter_name=name)
        self.model.eval()
        self.loaded.add(user)

    @contextlib.contextmanager
    def use(self, user: int | None):
        """Activate `user`'s adapter (None or a user without one: the global model, adapters disabled)."""
        if user is None or user not in self.paths:
            if self.loaded:
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model
            return
        if user not in self.loaded:
            self._load(user)
        self.model.set_adapter(f"user_{user}")
        yield self.model
