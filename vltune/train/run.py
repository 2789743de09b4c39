"""What every training run does at its start and its end, written once for sft, grpo, vla (and personalize):

- `open_run`: the run directory -- refused when it holds a previous run (`claim_output_dir`) --, logging,
  train.log (the console tee), the seed, the W&B project, the resolved
  arguments in args.json (reloadable with --config);
- `load_base`: the model path (--model or the embedded tiny model), its processor and its family;
- `log_preflight`: gradients reach every trainable group, checked on a real batch before the first step;
- `resolve_resume`: what --resume_from_checkpoint means, the same in every command;
- `write_model_card`: the README.md in the output directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch

from ..args import dump_config
from ..checkpoints import list_checkpoints, unmark
from ..console import TeeLog, is_main_process, setup_logging
from ..resume import wants_resume

logger = logging.getLogger("vltune")


# What shows that a directory holds a run that trained (besides checkpoint-N/): an attempt that stopped before
# training (a wrong --dataset) leaves only args.json and train.log, and running again after the fix is no
# conflict. What --overwrite_output_dir deletes: those, and the files a new run would append to or mix with
# (logs, TensorBoard events); the rest is rewritten by the new run.
RUN_FILES = ("trainer_state.json", "train_results.json")
RUN_LEFTOVERS = ("args.json", "train.log", "completions.jsonl", "metrics.csv", "best_checkpoints.json", "runs")


def claim_output_dir(out: Path, resume, overwrite: bool, extra: tuple = ()) -> None:
    """A new run never trains into a directory that holds a previous one: it would append to its train.log and
    overwrite its checkpoint-N one by one, and `--resume_from_checkpoint true` would later mix the two. Resuming
    is allowed; --overwrite_output_dir true deletes the previous run's checkpoints and logs first. Checked by the
    main process only (the others would see the files it has just written)."""
    import shutil

    if not is_main_process() or not out.is_dir() or wants_resume(resume):
        return
    names = RUN_FILES + extra
    checkpoints = [Path(c.path) for c in list_checkpoints(out)]
    found = sorted([p.name for p in out.iterdir() if p.name in names] + [c.name for c in checkpoints])
    if not found:
        return
    if not overwrite:
        from ..errors import UsageError

        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise UsageError(f"--output_dir {out} holds a previous run ({shown}): continue it with "
                         f"--resume_from_checkpoint true, replace it with --overwrite_output_dir true, or give a "
                         f"new --output_dir")
    for p in [*(p for p in out.iterdir() if p.name in names + RUN_LEFTOVERS), *checkpoints]:
        if p.is_dir():
            unmark(str(p))
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    logger.warning("[run] --overwrite_output_dir: deleted the previous run in %s (%s)", out, ", ".join(found))


@contextlib.contextmanager
def open_run(output_dir: str, arg_groups: tuple, seed: int, wandb_project: str | None = None):
    """Create `output_dir` (refusing one that holds a previous run unless the run resumes or
    --overwrite_output_dir is given), tee the console into its train.log, seed everything, write args.json;
    yields the Path."""
    from transformers import set_seed

    setup_logging()
    out = Path(output_dir)
    train = next((g for g in arg_groups if hasattr(g, "overwrite_output_dir")), None)
    if train is not None:
        claim_output_dir(out, train.resume_from_checkpoint, train.overwrite_output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with TeeLog(out / "train.log"):
        if wandb_project:
            os.environ["WANDB_PROJECT"] = wandb_project
        set_seed(seed)
        if is_main_process():
            dump_config(arg_groups, out / "args.json")
        yield out


def load_base(model_args, processor=None):
    """(model path, processor, family): --model or the embedded tiny model; `processor` is reused when given."""
    from ..models.load import load_processor, model_family, resolve_model_path

    path = resolve_model_path(model_args)
    if processor is None:
        processor = load_processor(path, model_args.max_pixels, model_args.min_pixels, model_args.trust_remote_code)
    family = model_family(path, model_args.trust_remote_code)  # a LoRA global model (personalize): its base's
    logger.info("[model] %s (family %s, coordinates %s)", path, family.name, family.coords)
    return path, processor, family


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def log_preflight(model, batch: dict, device, bf16: bool = False, fp16: bool = False, loss_fn=None) -> dict:
    """Run vltune.models.preflight on `batch` (moved to `device`) and log the gradient norm of each trained part."""
    from ..models.preflight import check_gradient_flow

    amp = torch.bfloat16 if bf16 else torch.float16 if fp16 else None
    kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {"autocast_dtype": amp}
    norms = check_gradient_flow(model, to_device(batch, device), **kwargs)
    logger.info("[preflight] gradients reach every trainable group: %s",
                ", ".join(f"{g} |g|={v:.3g}" for g, v in norms.items()))
    return norms


def resolve_resume(value, output_dir: str):
    """--resume_from_checkpoint: unset/false -> None (start fresh); true -> the newest checkpoint-N in
    --output_dir; anything else -> that checkpoint directory. Logs where the run resumes from
    (vltune.resume.resume_checkpoint); a missing checkpoint is a UsageError."""
    from ..resume import resume_checkpoint

    return resume_checkpoint(value, output_dir)


def load_hint(base: str, out: Path, train_type: str) -> str:
    """How to load what a run saved, as one line of Python."""
    if train_type in ("lora", "qlora"):
        return f"PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained('{base}'), '{out}')"
    return f"AutoModelForImageTextToText.from_pretrained('{out}')"


def write_model_card(out: Path, title: str, facts: list[str], usage: str, files: str, *, command: str,
                     library: str = "transformers", base_model: str | None = None) -> None:
    """README.md of an output directory: the Hub's metadata block (library, base model, tags), a title, facts as
    a list, how to load it, and what each file holds. The metadata block matters beyond the Hub: PEFT re-reads
    README.md when it saves into the same directory and warns ("Repo card metadata block was not found")
    without one."""
    meta = [f"library_name: {library}"] + ([f"base_model: {json.dumps(base_model)}"] if base_model else []) \
        + ["tags:", "- vltune", f"- vltune-{command}"]
    body = "".join(f"- {f}\n" for f in facts)
    (out / "README.md").write_text("---\n" + "\n".join(meta) + f"\n---\n\n# {title}\n\n{body}\n{usage}\n"
                                   f"Files: {files}.\n")
    logger.info("[done] saved to %s", out)
