"""Gradient-flow preflight: one forward/backward on a real batch before step 1.

seeds/03: LoRA + frozen backbone + gradient checkpointing died at the first
backward with "element 0 of tensors does not require grad and does not have a
grad_fn", after the whole setup had "passed". Here the same forward/backward
runs before training; if the loss has no graph, or a group of trainable
parameters gets no gradient, the run stops with the groups named and the fix.
RNG state and gradients are restored, so the check does not change training.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict

import torch
from torch import nn

from .families import part_of

logger = logging.getLogger("vltune")


class GradientFlowError(RuntimeError):
    pass


def _group_of(name: str) -> str:
    kind = "LoRA" if "lora_" in name else "full"
    return f"{part_of(name)} ({kind})"


def _checkpointing_state(model: nn.Module) -> tuple[bool, bool | None]:
    """(checkpointing on?, use_reentrant) read off the model's layers."""
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            func = getattr(m, "_gradient_checkpointing_func", None)
            reentrant = getattr(func, "keywords", {}).get("use_reentrant") if func is not None else None
            return True, reentrant
    return False, None


def _input_hook_present(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "_require_grads_hook", None) is not None


def _explain(model: nn.Module, what: str, groups: list[str] | None = None) -> str:
    gc_on, reentrant = _checkpointing_state(model)
    lines = [f"gradient-flow preflight failed: {what}"]
    if groups:
        lines.append("  groups without gradient: " + ", ".join(groups))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lines.append(f"  trainable tensors: {len(trainable)}" + (f" (e.g. {trainable[0]})" if trainable else ""))
    lines.append(f"  gradient checkpointing: {'on' if gc_on else 'off'}"
                 + (f", use_reentrant={reentrant}" if gc_on else "")
                 + f"; input-grad hook: {'present' if _input_hook_present(model) else 'absent'}")
    lines.append("  likely cause and fix:")
    if not trainable:
        lines.append("  - nothing is trainable: LoRA targets or freeze flags leave no parameter with requires_grad. "
                     "Check --target_modules and --freeze_vit/--freeze_aligner/--freeze_llm.")
    if gc_on and reentrant and not _input_hook_present(model):
        lines.append("  - reentrant checkpointing over frozen embeddings: the checkpointed layers' inputs do not "
                     "require grad, so nothing inside them (LoRA included) gets a gradient. Use "
                     "--gradient_checkpointing_kwargs '{\"use_reentrant\": false}' (vltune's default), or call "
                     "model.enable_input_require_grads() after enabling checkpointing.")
    elif gc_on and reentrant:
        lines.append("  - reentrant checkpointing: a checkpointed block whose inputs do not require grad (e.g. a "
                     "vision tower fed raw pixels) gives its LoRA/trainable weights no gradient. Use "
                     "use_reentrant=false.")
    if groups and any(g.startswith(("vision", "aligner")) for g in groups):
        lines.append("  - the vision tower / aligner may not run on this batch (no image in it?), or its output is "
                     "detached; freeze it (--freeze_vit/--freeze_aligner true) if it should not train.")
    if groups and any(g.startswith("other") for g in groups):
        lines.append("  - parameters outside the model's forward path (a head that is never called, or is called "
                     "under torch.no_grad()) are trainable; freeze them or wire them into the loss.")
    lines.append("  - a forward wrapped in torch.no_grad()/inference_mode, or parameters cast/replaced after the "
                 "optimizer was built, gives the same symptom.")
    return "\n".join(lines)


@contextlib.contextmanager
def _preserved_rng():
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def check_gradient_flow(model: nn.Module, batch: dict, loss_fn=None, autocast_dtype: torch.dtype | None = None) -> dict:
    """Run one forward/backward on `batch`; raise GradientFlowError if a trainable group gets no gradient.

    Returns {group: gradient norm} for the log. `loss_fn(model, batch) -> loss` overrides `model(**batch).loss`.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise GradientFlowError(_explain(model, "no parameter requires grad"))
    saved = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in params.items()}
    was_training = model.training
    model.train()
    device = next(iter(params.values())).device
    try:
        with _preserved_rng():
            for p in params.values():
                p.grad = None
            ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                   else contextlib.nullcontext())
            with ctx:
                loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
            if loss is None:
                raise GradientFlowError(_explain(model, "the model returned no loss (are labels in the batch?)"))
            if not torch.isfinite(loss.detach()).all():
                raise GradientFlowError(f"gradient-flow preflight: the loss on the first batch is {loss.item()} "
                                        "(check the data, labels and learning setup)")
            if not loss.requires_grad:
                raise GradientFlowError(_explain(
                    model, "the loss does not require grad: the first backward would fail with 'element 0 of "
                           "tensors does not require grad and does not have a grad_fn'"))
            loss.backward()
            norms: dict[str, float] = defaultdict(float)
            for n, p in params.items():
                g = _group_of(n)
                norms[g] += 0.0 if p.grad is None else float(p.grad.detach().float().pow(2).sum())
            dead = sorted(g for g, v in norms.items() if v == 0.0)
            if dead:
                raise GradientFlowError(_explain(model, "trainable parameters received no gradient", dead))
    finally:
        for n, p in params.items():
            p.grad = saved[n]
        model.train(was_training)
    return {g: v ** 0.5 for g, v in sorted(norms.items())}
