"""A per-rank debug dump of a training run, off unless `$VLTUNE_DEBUG_DIST_DIR` is set.

`DistributedDebugCallback` writes what data parallelism must make true, one JSON per rank: which batches each
rank saw (they must differ), and a checksum of every parameter at the end (they must be equal).
`tests/integration/test_distributed.py` launches real 2-process runs and reads it; users read it to see what
each rank did (README, "Multi-GPU").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

logger = logging.getLogger("vltune")

DEBUG_DIST_ENV = "VLTUNE_DEBUG_DIST_DIR"


def _digest(tensor: torch.Tensor) -> str:
    # float32 bytes so that equal values give equal digests whatever the storage dtype
    return hashlib.sha1(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def _batch_fingerprint(kwargs: dict) -> str:
    h = hashlib.sha1()
    for name in sorted(kwargs):
        value = kwargs[name]
        if torch.is_tensor(value) and name != "labels":
            h.update(name.encode())
            h.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class DistributedDebugCallback(TrainerCallback):
    """Dump per-rank facts of a (multi-process) run to `<dir>/rank<R>.json` at the end of training.

    JSON keys: rank, world_size, backend ("gloo", "nccl" or null), parallel_mode, wrapper (the class the
    Trainer wrapped the model in: DistributedDataParallel, DeepSpeedEngine, ...), global_step,
    batches (one fingerprint per training forward: a hash of the model inputs, labels excluded),
    params_start / params_end ({name: digest} of the trainable parameters), params_all_end (one digest over
    every parameter). Under ZeRO-3 each rank holds only its partition of the weights, so the checksums cover
    that partition. Costs one hash of the inputs per forward: for debugging and tests, off by default.
    """

    def __init__(self, out_dir: str | os.PathLike, trainer=None):
        self.out_dir = Path(out_dir)
        self.trainer = trainer
        self.batches: list[dict] = []
        self.params_start: dict[str, str] = {}
        self._hook = None
        self._state = None

    def _record(self, module, args, kwargs):
        if module.training:
            self.batches.append({"step": self._state.global_step if self._state else None,
                                 "fingerprint": _batch_fingerprint(kwargs)})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._state = state
        self.params_start = {n: _digest(p) for n, p in model.named_parameters() if p.requires_grad}
        self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        import torch.distributed as dist

        if self._hook is not None:
            self._hook.remove()
        initialized = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if initialized else args.process_index
        wrapped = getattr(self.trainer, "model_wrapped", None) if self.trainer is not None else None
        all_params = hashlib.sha1()
        for name, p in sorted(model.named_parameters()):
            all_params.update(f"{name}:{_digest(p)}".encode())
        info = {
            "rank": rank,
            "world_size": dist.get_world_size() if initialized else args.world_size,
            "backend": dist.get_backend() if initialized else None,
            "parallel_mode": str(getattr(args.parallel_mode, "value", args.parallel_mode)),
            "wrapper": type(wrapped).__name__ if wrapped is not None else None,
            "global_step": state.global_step,
            "batches": self.batches,
            "params_start": self.params_start,
            "params_end": {n: _digest(p) for n, p in model.named_parameters() if p.requires_grad},
            "params_all_end": all_params.hexdigest()[:16],
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps(info, indent=1))


def attach_debug_callback(trainer) -> None:
    """Add `DistributedDebugCallback` to `trainer` when `$VLTUNE_DEBUG_DIST_DIR` is set (no-op otherwise)."""
    out_dir = os.environ.get(DEBUG_DIST_ENV)
    if out_dir:
        trainer.add_callback(DistributedDebugCallback(out_dir, trainer))
        logger.info("[debug] writing per-rank batches and parameter checksums to %s", out_dir)
