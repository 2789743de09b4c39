"""The adapters a server can answer with, loaded lazily onto the one global model and kept LRU.

Names: `user_<id>` for every adapter of --per_user_adapters (found by `vltune.models.adapters`, as
`vltune infer --per_user_adapters` finds them) and the names of --adapters name=path. At most
--max_loaded_adapters stay loaded between batches; the least recently used one is unloaded when another
is needed. The global weights are loaded once and never reloaded.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from ..models.adapters import USER_DIR, find_user_adapters
from ..models.families import part_of
from .protocol import APIError

logger = logging.getLogger("vltune")

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


def parse_named_adapters(specs: list[str]) -> dict[str, Path]:
    """--adapters name=path ... -> {name: path}; raises ValueError naming the bad entry and the fix."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapters {spec}: give name=path (the global model itself, or a global LoRA, "
                             f"is --model)")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"--adapters {spec}: no adapter_config.json in {path}; give a LoRA adapter directory")
        if name in named or name == BASE:
            raise ValueError(f"--adapters {spec}: the name {name!r} is used twice or reserved")
        named[name] = Path(path)
    return named


def adapter_paths(per_user_dir: str | None, named: dict[str, Path]) -> dict[str, Path]:
    """{name: dir} of every servable adapter: user_<id> of --per_user_adapters, then --adapters' names."""
    paths = {f"user_{u}": p for u, p in find_user_adapters(per_user_dir).items()} if per_user_dir else {}
    clash = set(paths) & set(named)
    if clash:
        raise ValueError(f"--adapters: the name(s) {', '.join(sorted(clash))} are already users of "
                         f"--per_user_adapters; pick other names")
    return {**paths, **named}


def _targets_vision(path: Path) -> bool:
    """Does this LoRA adapter put layers on the vision tower? (PEFT's per-row adapter routing indexes rows,
    but the vision tower sees image patches, so such adapters are run in batches of their own.)"""
    cfg = json.loads((path / "adapter_config.json").read_text())
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        return "visual" in targets or "vision" in targets
    return any(part_of(t) == "vision" for t in targets)


class AdapterPool:
    """{name: adapter dir} available; `prepare(names)` loads the missing ones (evicting LRU) and returns
    the model to call with PEFT's `adapter_names=` (or the plain global model while none is loaded)."""

    def __init__(self, model, paths: dict[str, Path], max_loaded: int = 32):
        if max_loaded < 1:
            raise ValueError("--max_loaded_adapters must be at least 1")
        self.paths = dict(paths)
        self.vision = {name: _targets_vision(p) for name, p in self.paths.items()}
        self.base = model
        self.model = model  # becomes a PeftModel with the first adapter loaded
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.max_loaded = max_loaded
        self.loads = 0  # adapter loads so far (reloads after eviction included)
        self.lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return sorted(self.paths, key=lambda n: (not USER_DIR.match(n), int(n[5:]) if USER_DIR.match(n) else 0, n))

    def resolve(self, model_field: str | None, user_field: str | None, base_name: str) -> tuple[str | None, str | None]:
        """(adapter name or None for the global model, identity to authorise) of a request.

        `model` = the global model's name (or empty): the `user` field, if any, picks `user_<id>`;
        `model` = "user_<id>": that user; `model` = an --adapters name: that adapter. A user without an
        adapter gets the global model (adapter None) but is still the identity a key must reach."""
        user = None
        if user_field:
            user = user_field if USER_DIR.match(user_field) else f"user_{user_field}"
        if model_field in (None, "", base_name):
            identity = user
        elif USER_DIR.match(model_field):
            if user is not None and user != model_field:
                raise APIError(400, f"user: {user_field!r} disagrees with model {model_field!r}; give one of them",
                               param="user")
            identity = model_field
        elif model_field in self.paths:
            return model_field, model_field
        else:
            raise APIError(404, f"model: no adapter or model named {model_field!r} here; GET /v1/models lists "
                                f"them (user_<id> picks a user's adapter)", param="model", code="model_not_found")
        return (identity if identity in self.paths else None), identity

    def groups(self, names: list[str | None]) -> list[list[int]]:
        """Row indices split into generate calls: rows ordered by adapter, at most max_loaded distinct adapters
        per call, and an adapter with LoRA on the vision tower only with rows of its own."""
        order = sorted(range(len(names)), key=lambda i: (names[i] is not None, names[i] or ""))
        out: list[list[int]] = []
        current: list[int] = []
        distinct: set[str] = set()
        for i in order:
            key = names[i] or BASE
            new = key not in distinct
            vision_clash = new and (self.vision.get(key, False) or any(self.vision.get(n, False) for n in distinct))
            too_many = new and key != BASE and len(distinct - {BASE}) >= self.max_loaded
            if current and (vision_clash or too_many):
                out.append(current)
                current, distinct = [], set()
            current.append(i)
            distinct.add(key)
        if current:
            out.append(current)
        return out

    def prepare(self, names: list[str | None]):
        """(model, adapter_names for generate or None) for rows that use `names` (None: the global model)."""
        from peft import PeftModel

        wanted = [n for n in dict.fromkeys(names) if n is not None]
        with self.lock:
            for name in wanted:
                if name in self.loaded:
                    self.loaded.move_to_end(name)
                    continue
                if not self.loaded:
                    self.model = PeftModel.from_pretrained(self.base, str(self.paths[name]), adapter_name=name)
                else:
                    self.model.load_adapter(str(self.paths[name]), adapter_name=name)
                self.model.eval()
                self.loaded[name] = None
                self.loads += 1
                logger.info("[serve] loaded adapter %s (%d in memory)", name, len(self.loaded))
                while len(self.loaded) > self.max_loaded:
                    victim = next(n for n in self.loaded if n not in wanted)
                    if self.model.active_adapter == victim:
                        self.model.set_adapter(name)
                    self.model.delete_adapter(victim)
                    del self.loaded[victim]
                    logger.info("[serve] unloaded adapter %s (least recently used)", victim)
            if not self.loaded:
                return self.model, None
            if wanted:
                self.model.set_adapter(wanted[0])
            return self.model, [n or BASE for n in names]
