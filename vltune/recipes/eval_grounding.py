"""vltune eval grounding: click accuracy of a model, a global model, and per-user adapters, side by side.

    vltune eval grounding --model out/global --dataset data/gui/test.jsonl --users 1-10
    vltune eval grounding --model out/global --per_user_adapters out/personal --zero_shot auto \\
        --dataset data/gui/test.jsonl --users 1-10 --output_dir out/eval      # the seeds/04 comparison
    vltune eval grounding --model Qwen/Qwen3-VL-8B-Instruct --adapters out/global_lora --dataset test.jsonl

Rows ("setups") evaluated on the same samples, with the same processor (the one saved beside --model /
--adapters by training, so images are resized as in training; --max_pixels overrides):
  zero-shot     --zero_shot MODEL, or `auto`: the model --model was fine-tuned from;
  global        --model (+ --adapters, merged in memory), loaded once;
  personalised  the global model + each user's adapter from --per_user_adapters (a user without one gets
                the global model), switched on the one loaded model.
Without --per_user_adapters the global row is named `model`.

Scores, per user and overall (and per instruction kind when the data has a `kind` column): click accuracy
(the predicted point inside the target box), mean distance to the target centre in pixels of the original
image (parsed answers only), unparseable-answer rate. Targets come from a `target` column
({"box", "point"}) or ms-swift's `objects.bbox` (pixels). Answers are converted from the model family's
coordinate convention (0-1000 relative, or Qwen2.5-VL's pixels of the resized image) with the processor used.

Writes to --output_dir: report.md (tables + the click grid), report.json (every figure),
predictions_<setup>.jsonl (each answer, parsed point, hit), clicks_<setup>.png (screenshots with
true box and click in green, prediction in red) and report.html (one self-contained page: the tables, and
per user their screenshots with the true box and each setup's click, filterable by user and kind).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..args import ModelArguments, parse_args
from ..console import setup_logging
from ..errors import UsageError
from ..eval.html_report import pct, px

logger = logging.getLogger("vltune")


@dataclass
class EvalGroundingArguments:
    dataset: list[str] = field(default_factory=list, metadata={
        "help": "Grounding data with targets (ms-swift JSONL with `target` or `objects.bbox`, per-user pickles, "
                "...). Each sample's final assistant turn is dropped from the prompt."})
    adapters: str | None = field(default=None, metadata={
        "help": "A LoRA adapter on --model that makes the global model (merged in memory)."})
    per_user_adapters: str | None = field(default=None, metadata={
        "help": "The --output_dir of `vltune personalize` (adapters/user_<id>/): adds the personalised row."})
    zero_shot: str | None = field(default=None, metadata={
        "help": "Also evaluate this model as the zero-shot row; `auto` = the model --model was fine-tuned from "
                "(read from its args.json or adapter_config.json)."})
    frequent_app_baseline: list[str] = field(default_factory=list, metadata={
        "help": "The users' training data (e.g. data/gui/train.jsonl): adds the no-training personalisation "
                "baseline `most-frequent app`, the global model asked each habit row as 'Open <app>' with the app "
                "its user used most in that category there. Needs the user/kind/category/app columns of "
                "`vltune data synth gui`."})
    users: str | None = field(default=None, metadata={"help": "Only these users, e.g. '1-10'."})
    allow_pickle: bool = field(default=False, metadata={
        "help": "Allow reading per-user .pkl files (unpickling runs code from the file: only for data you trust)."})
    num_samples: int | None = field(default=None, metadata={"help": "Only the first N samples."})
    batch_size: int = field(default=16, metadata={"help": "Prompts generated together (left-padded)."})
    max_new_tokens: int = field(default=32, metadata={"help": "Upper bound on generated tokens per answer."})
    output_dir: str = field(default="output/eval_grounding", metadata={"help": "Where the report goes."})
    plot_samples: int = field(default=16, metadata={"help": "Screenshots drawn per setup in clicks_<setup>.png."})
    html_per_user: int = field(default=12, metadata={
        "help": "Screenshots per user in report.html's gallery, each with the true box and every setup's click "
                "but zero-shot's (-1: all of them, 0: tables only)."})


# ---------------------------------------------------------------------------- running setups
def _same_model(model):
    """model_for_user for a setup without per-user adapters."""
    return lambda user: contextlib.nullcontext(model)


def run_eval_grounding(model_args: ModelArguments, args: EvalGroundingArguments) -> dict:
    from ..data.formats import read_dataset
    from ..data.formats import target_of
    from ..eval.grounding import breakdown, frequent_app_instructions, score_samples, user_gains
    from ..generation import answers_per_user, generate_answers
    from ..models.adapters import UserAdapters, load_global, zero_shot_model_of
    from ..models.inference import load_for_inference
    from ..models.load import model_family, resolve_model_path

    setup_logging()
    if not args.dataset:
        raise UsageError("vltune eval grounding: give the evaluation data with --dataset FILE")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples, errors = read_dataset(args.dataset, users=args.users, allow_pickle=args.allow_pickle)
    for e in errors:
        logger.warning("[data] skipped unreadable record: %s", e)
    samples = samples[: args.num_samples] if args.num_samples else samples
    usable = []
    for s in samples:
        try:
            target_of(s)
            usable.append(s)
        except ValueError as e:
            logger.warning("[data] skipped: %s", e)
    samples = usable
    if not samples:
        raise UsageError(f"vltune eval grounding: no sample with a grounding target in {args.dataset}")

    t0 = time.time()
    global_model, processor, described = load_global(model_args, _global_spec(model_args, args))
    base_for_family = resolve_model_path(model_args) if not args.adapters else args.adapters
    convention = model_family(base_for_family).coords
    logger.info("[eval] %d sample(s), %d user(s); coordinates %s", len(samples),
                len({s.extra.get('user') for s in samples}), convention)

    setups: dict[str, dict] = {}
    predictions: dict[str, list[dict]] = {}

    def evaluate(name: str, model_for_user, asked=None) -> None:
        t = time.time()
        answers = answers_per_user(asked or samples, model_for_user, lambda model, part, user: generate_answers(
            model, processor, part, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            desc=f"{name} user {user}"))
        records = score_samples(samples, answers, convention, processor)
        predictions[name] = records
        setups[name] = {**breakdown(records), "seconds": round(time.time() - t, 1)}
        o = setups[name]["overall"]
        logger.info("[eval] %-12s click accuracy %.1f%%, mean distance %s px, unparseable %.1f%%", name,
                    100 * o["click_accuracy"], f"{o['mean_distance_px']:.1f}" if o["mean_distance_px"] is not None
                    else "-", 100 * o["unparseable_rate"])

    if args.zero_shot:
        zs_path = zero_shot_model_of(_global_spec(model_args, args)) if args.zero_shot == "auto" else args.zero_shot
        logger.info("[eval] zero-shot model: %s%s", zs_path,
                    " (--zero_shot auto: the model the global model was fine-tuned from)"
                    if args.zero_shot == "auto" else "")
        zs_model, _, _ = load_for_inference(replace(model_args, model=zs_path))
        evaluate("zero-shot", _same_model(zs_model))
        del zs_model
        gc.collect()
    evaluate("global" if args.per_user_adapters else "model", _same_model(global_model))
    memory = None
    if args.frequent_app_baseline:
        history, _ = read_dataset(args.frequent_app_baseline, users=args.users, allow_pickle=args.allow_pickle)
        asked, memory = frequent_app_instructions(history, samples)
        shown = dict(list(memory.items())[:3])
        logger.info("[eval] most-frequent app baseline from %s, %d user(s)' histories: %s%s (all in report.json)",
                    args.frequent_app_baseline, len(memory), shown, " ..." if len(memory) > 3 else "")
        evaluate("most-frequent app", _same_model(global_model), asked)
    kept_global = []
    if args.per_user_adapters:
        kept_global = _kept_global(args.per_user_adapters)
        bank = UserAdapters(global_model, args.per_user_adapters)
        no_adapter = sorted({s.extra.get("user") for s in samples} - set(bank.users), key=str)
        if no_adapter:
            logger.warning("[eval] user(s) without an adapter get the global model: %s%s", no_adapter,
                           f" (kept global by personalize's guard: {kept_global})" if kept_global else "")
        evaluate("personalised", bank.use)

    report = {"model": described, "adapters": args.adapters, "per_user_adapters": args.per_user_adapters,
              "zero_shot": args.zero_shot, "dataset": args.dataset, "users": args.users,
              "coordinates": convention, "n_samples": len(samples), "setups": setups,
              "gains": {name: user_gains(setups["global"], setups[name]) for name in setups
                        if "global" in setups and name not in ("global", "zero-shot")},
              "kept_global": kept_global, "frequent_app_memory": memory,
              "seconds": round(time.time() - t0, 1)}
    write_report(out, report, predictions, samples, args.plot_samples, args.html_per_user)
    print(format_overall(report))
    print(f"report: {out / 'report.md'} (+ report.json, report.html, predictions_*.jsonl, clicks_*.png)")
    return report


def _kept_global(per_user_adapters: str) -> list:
    """Users `vltune personalize`'s guard left on the global model (its personalize.json), if any."""
    summary = Path(per_user_adapters) / "personalize.json"
    return json.loads(summary.read_text()).get("kept_global", []) if summary.is_file() else []


def _global_spec(model_args: ModelArguments, args: EvalGroundingArguments) -> str | None:
    return args.adapters or model_args.model


# ---------------------------------------------------------------------------- report
def format_overall(report: dict) -> str:
    lines = ["| setup | click accuracy | mean distance (px) | unparseable | n |", "|---|---|---|---|---|"]
    for name, s in report["setups"].items():
        o = s["overall"]
        lines.append(f"| {name} | {pct(o['click_accuracy'])} | {px(o['mean_distance_px'])} | "
                     f"{pct(o['unparseable_rate'])} | {o['n']} |")
    return "\n".join(lines)


def write_report(out: Path, report: dict, predictions: dict, samples, plot_samples: int,
                 html_per_user: int = 12) -> None:
    from ..data.images import load_image
    from ..eval.html_report import write_html_report
    from ..eval.plots import plot_clicks

    (out / "report.json").write_text(json.dumps(report, indent=2))
    names = list(report["setups"])
    md = ["# Grounding evaluation\n", f"- model: `{report['model']}`",
          f"- data: {', '.join(map(str, report['dataset']))} ({report['n_samples']} samples"
          f"{', users ' + report['users'] if report['users'] else ''})",
          f"- coordinates: {report['coordinates']}\n", "## Overall\n", format_overall(report), ""]
    kinds = sorted({k for s in report["setups"].values() for k in s["per_kind"]})
    if kinds:
        md += ["## By instruction kind (click accuracy)\n", "| kind | " + " | ".join(names) + " |",
               "|---|" + "---|" * len(names)]
        for k in kinds:
            md.append(f"| {k} | " + " | ".join(pct(report["setups"][n]["per_kind"].get(k, {}).get("click_accuracy"))
                                               for n in names) + " |")
        md.append("")
    for name, g in report.get("gains", {}).items():
        if g["n_users"]:
            md += [f"## {name} vs global, per user\n",
                   f"Gain in click-accuracy points over {g['n_users']} user(s): min {g['min']:+.1f}, median "
                   f"{g['median']:+.1f}, max {g['max']:+.1f}; {g['worse']} user(s) worse than global.\n"]
    if report.get("kept_global"):
        md += [f"Kept on the global model by `vltune personalize`'s guard (their adapter scored below it on their "
               f"own held-out rows): users {', '.join(map(str, report['kept_global']))}.\n"]
    users = list(next(iter(report["setups"].values()))["per_user"])
    md += ["## Per user (click accuracy)\n", "| user | n | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]
    for u in users:
        first = report["setups"][names[0]]["per_user"][u]
        md.append(f"| {u} | {first['n']} | " + " | ".join(pct(report["setups"][n]["per_user"][u]["click_accuracy"])
                                                        for n in names) + " |")
    md.append("")
    for name, records in predictions.items():
        slug = name.replace(" ", "_")
        with open(out / f"predictions_{slug}.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        picks = _spread(records, plot_samples)
        items = [{"image": load_image(samples[i].images[0]), "box": records[i]["target"].get("box"),
                  "truth": records[i]["target"]["point"], "pred": records[i]["pred"], "ok": records[i]["ok"],
                  "label": f"u{records[i]['user']}: {samples[i].instruction()}"} for i in picks]
        if items:
            plot_clicks(items, out / f"clicks_{slug}.png", title=f"{name}: true (green) vs predicted (red)")
            md += [f"## {name}: examples\n", f"![{name}](clicks_{slug}.png)\n"]
    (out / "report.md").write_text("\n".join(md))
    write_html_report(out, report, predictions, samples, per_user=html_per_user)


def _spread(records: list[dict], k: int) -> list[int]:
    """Up to k sample indices spread over users (the first few of each user in turn)."""
    by_user = defaultdict(list)
    for i, r in enumerate(records):
        by_user[r["user"]].append(i)
    picks, depth = [], 0
    while len(picks) < k and any(depth < len(v) for v in by_user.values()):
        for v in by_user.values():
            if depth < len(v) and len(picks) < k:
                picks.append(v[depth])
        depth += 1
    return picks


def main(argv: list[str] | None = None) -> dict:
    model_args, args = parse_args((ModelArguments, EvalGroundingArguments), argv, prog="vltune eval grounding",
                                  description=__doc__)
    return run_eval_grounding(model_args, args)
