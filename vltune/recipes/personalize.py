"""vltune personalize: one LoRA adapter per user on top of a global model (seeds/04's second stage).

    vltune personalize --base out/global --dataset data/gui/train.jsonl --users 1-10 --output_dir out/personal
    vltune personalize --base out/global_lora --dataset data/gui/train --allow_pickle true --users 1-10 ...
    vltune personalize --config examples/gui_agent_personalize.yaml
    vltune personalize --base out/global --dataset data/gui/train.jsonl --users 1-10 --workers 2 --output_dir out/personal

The global model (`--base`: the --output_dir of `vltune sft`, full weights or a LoRA adapter, which is merged
in memory) is loaded once; then, for each user of --users, a fresh LoRA adapter is trained on that user's
own samples only (rows whose `user` column, or whose user_<id>.pkl file, is that user), saved to
`<output_dir>/adapters/user_<id>/`, and removed again, leaving the global weights untouched for the next
user. Every `vltune sft` flag applies per user (--lora_rank, --learning_rate, --num_train_epochs, ...).

Two guards against an adapter that forgets the screen while it learns the user:
  replay  --replay_users 11-83 --replay_where kind=explicit mixes other users' rows (here only those every
          user answers alike) into each adapter's training, --replay_ratio rows per own row;
  guard   --guard_ratio (0.1) of the user's screenshots are held out; the global model and the adapter are
          scored there (click accuracy), and a user whose adapter is worse keeps the global model: the adapter
          goes to rejected/user_<id>/ and personalize.json lists the user under kept_global.
`examples/gui_agents.sh` uses both; the README gives the measurements that chose them.

--workers N trains N users at a time, in N processes that each load the global model once (one per CPU core,
or one per GPU); every adapter is the one a single process would train, and the output is the same.
A stopped run (Ctrl-C, a crash, a lost machine) continues with --resume_from_checkpoint true: users it finished
are kept as they are, and a user it stopped in continues from its newest complete checkpoint (with
--save_strategy no, from the start).

Writes: adapters/user_<id>/ (adapter, processor, args.json, train.log, loss.png per user), rejected/,
personalize.json (per user: samples, rows trained on / replayed / held out, both held-out scores, steps,
final loss, seconds; kept_global; each user's entry also in its directory as personalize_user.json, written when
the user is done) and README.md; with --workers, workers/worker_<k>.log.
Use them with `vltune eval grounding --model <base> --per_user_adapters <output_dir>` and
`vltune infer --model <base> --per_user_adapters <output_dir> --dataset ...` (each row goes to its user's adapter).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..args import ModelArguments, SFTDataArguments, SFTTrainingArguments, TunerArguments, dump_config, parse_args
from ..checkpoints import list_checkpoints
from ..console import setup_logging
from ..errors import UsageError
from ..resume import resumes_newest, wants_resume

logger = logging.getLogger("vltune")


@dataclass
class PersonalizeArguments:
    base: str | None = field(default=None, metadata={
        "help": "The global model: the --output_dir of `vltune sft` (full weights, or a LoRA adapter that is "
                "merged into its base in memory). Loaded once for all users."})
    min_user_samples: int = field(default=1, metadata={
        "help": "Users with fewer samples are skipped (and listed) instead of getting an adapter."})
    replay_users: str | None = field(default="others", metadata={
        "help": "Users whose rows of --dataset are mixed into every adapter's training (replay), so the adapter "
                "learns its user's habits without forgetting what the global model does for everyone: `others` "
                "(every user of --dataset not in --users, e.g. the global model's training users), a list such "
                "as '11-83', or `none` (the user's own rows only)."})
    replay_where: str | None = field(default="kind=explicit", metadata={
        "help": "Replay only rows whose COLUMN equals VALUE (COLUMN=VALUE; rows without that column are "
                "replayed): kind=explicit keeps the rows every user answers alike, so other users' habits do not "
                "pull against this user's. `none`: replay every row."})
    replay_ratio: float = field(default=1.0, metadata={
        "help": "Replayed rows per own training row of the user (with --replay_users)."})
    guard_ratio: float = field(default=0.1, metadata={
        "help": "Share of each user's rows (whole screenshots) held out as their validation slice: the global "
                "model and the new adapter are both scored there (click accuracy), and a user whose adapter "
                "scores below the global model keeps the global model (the adapter goes to rejected/, "
                "personalize.json lists the user under kept_global). 0 turns the guard off."})
    workers: int = field(default=1, metadata={
        "help": "Processes that train adapters side by side, each loading the global model once and taking every "
                "N-th user of --users: on a CPU machine one per core (each gets cores/N torch threads unless "
                "OMP_NUM_THREADS is set), on a machine with several GPUs one per GPU (CUDA_VISIBLE_DEVICES is set "
                "per worker). Every user's adapter is the one a single process trains; adapters/, rejected/ and "
                "personalize.json are merged into --output_dir, each worker's log kept in workers/."})


def _weights_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the trainable-by-default weights, to prove a user's run left them untouched."""
    with torch.no_grad():
        return float(sum(p.double().sum() for n, p in model.named_parameters() if "lora_" not in n))


def _click_accuracy(model, processor, samples: list, convention: str) -> float:
    from ..eval.grounding import score_clicks
    from ..generation import generate_answers

    answers = generate_answers(model, processor, samples, desc="validation slice")
    return score_clicks(samples, answers, convention, processor)["click_accuracy"]


def _replay_rows(pool: list, n: int, seed: int, user: int) -> list:
    import random

    if not pool or n <= 0:
        return []
    rng = random.Random(f"replay-{seed}-{user}")
    return rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]


USER_RECORD = "personalize_user.json"  # in adapters/ or rejected/user_<id>/: written once the user is done


def _write_user_record(record: dict) -> None:
    where = Path(record["adapter"] or record["rejected_adapter"])
    (where / USER_RECORD).write_text(json.dumps(record, indent=2))


def _finished_user(root: Path, user: int) -> dict | None:
    """The personalize.json entry of a user a stopped run finished (None: not finished), its paths where the
    user's directory is now."""
    found = [(f.stat().st_mtime, sub, f) for sub in ("adapters", "rejected")
             if (f := root / sub / f"user_{user}" / USER_RECORD).is_file()]
    if not found:
        return None
    _, sub, f = max(found)
    record = json.loads(f.read_text())
    moved = dict(record, adapter=str(f.parent) if sub == "adapters" else None)
    moved.pop("rejected_adapter", None)
    if sub == "rejected":
        moved["rejected_adapter"] = str(f.parent)
    if moved != record:  # gathered from a worker's directory, or moved by hand: say where it is now
        _write_user_record(moved)
    return moved


def _move_user_dirs(worker: Path, root: Path, finished_only: bool = False) -> None:
    """Move a worker's adapters/ and rejected/user_<id> directories into root's (with finished_only, only those
    of users it finished). Root's old dir of the same user is replaced: a move onto it would nest inside."""
    for sub in ("adapters", "rejected"):
        for d in sorted((worker / sub).iterdir()) if (worker / sub).is_dir() else ():
            if finished_only and not (d / USER_RECORD).is_file():
                continue
            (root / sub).mkdir(exist_ok=True)
            shutil.rmtree(root / sub / d.name, ignore_errors=True)
            shutil.move(str(d), str(root / sub / d.name))


def _read_rows(data: SFTDataArguments, p: PersonalizeArguments) -> tuple[list, list, list]:
    """(the --users' rows, records that could not be read, the replay pool), reading --dataset once also when the
    pool is every other user's rows (`--replay_users others`)."""
    from ..data.formats import parse_users, read_dataset

    spec = (p.replay_users or "none").strip().lower()
    wanted = set(parse_users(data.users) or ())
    if spec != "others" or not wanted:
        samples, errors = read_dataset(data.dataset, users=data.users, allow_pickle=data.allow_pickle)
        return samples, errors, _replay_pool(data, p, spec, wanted)
    rows, errors = read_dataset(data.dataset, allow_pickle=data.allow_pickle)
    tagged = [s for s in rows if "user" in s.extra]
    samples = [s for s in tagged if int(s.extra["user"]) in wanted]
    if not samples:  # the filtered read raises the error that names the users --dataset holds
        read_dataset(data.dataset, users=data.users, allow_pickle=data.allow_pickle)
    return samples, errors, _replay_pool(data, p, spec, wanted,
                                         [s for s in tagged if int(s.extra["user"]) not in wanted])


def _replay_pool(data: SFTDataArguments, p: PersonalizeArguments, spec: str, wanted: set, others: list | None = None
                 ) -> list:
    """The rows --replay_users / --replay_where pick for replay (empty when there are none). spec: --replay_users
    lower-cased ("none", "others" or user ids), wanted: the --users ids, others: the rows of every user but
    --users, already read by _read_rows (for `--replay_users others`)."""
    from ..data.formats import parse_users, read_dataset

    if spec == "none":
        return []
    if spec == "others":  # none without --users (every user gets an adapter) or when nobody else is in --dataset
        pool = others or []
    else:
        if set(parse_users(p.replay_users) or ()) & wanted:
            raise UsageError(f"--replay_users {p.replay_users} overlaps --users {data.users}: replay other users' "
                             f"rows (or `others`)")
        pool, _ = read_dataset(data.dataset, users=p.replay_users, allow_pickle=data.allow_pickle)
    where = (p.replay_where or "none").strip()
    if pool and where.lower() != "none":
        column, sep, value = where.partition("=")
        if not sep or not column:
            raise UsageError(f"--replay_where {p.replay_where}: give COLUMN=VALUE, e.g. kind=explicit (or none)")
        pool = [s for s in pool if column not in s.extra or str(s.extra[column]) == value]
        if not pool:
            raise UsageError(f"--replay_where {p.replay_where}: no row of --replay_users {p.replay_users} in "
                             f"{data.dataset} has {column} == {value!r}")
    if pool:
        users = sorted({int(s.extra["user"]) for s in pool if "user" in s.extra})
        logger.info("[personalize] replay: %d row(s) of %d other user(s)%s, %.2g per own row", len(pool),
                    len(users), f" where {where}" if where.lower() != "none" else "", p.replay_ratio)
    else:
        logger.info("[personalize] replay: no other users' rows in %s (--replay_users %s): own rows only",
                    data.dataset, p.replay_users)
    return pool


def run_personalize(model_args: ModelArguments, tuner: TunerArguments, data: SFTDataArguments,
                    args: SFTTrainingArguments, p: PersonalizeArguments) -> dict:
    from ..data.formats import parse_users
    from ..data.splits import split_holdout_groups
    from ..models.adapters import load_global
    from ..models.load import model_family, resolve_model_path
    from ..train.sft import run_sft

    setup_logging()
    if tuner.train_type not in ("lora",):
        raise UsageError("vltune personalize trains one LoRA adapter per user: use --train_type lora "
                         "(full or qlora copies of the model per user are what this command avoids)")
    if not data.dataset:
        raise UsageError("vltune personalize: give the users' data with --dataset (JSONL with a `user` column, "
                         "or a per-user pickle dir with --allow_pickle true)")
    from ..train.run import claim_output_dir

    root = Path(args.output_dir)
    # Checked once for the whole run; each user's directory under adapters/ is then new (or cleared with it).
    claim_output_dir(root, args.resume_from_checkpoint, args.overwrite_output_dir,
                     extra=("personalize.json", "adapters", "rejected", "workers"))
    root.mkdir(parents=True, exist_ok=True)
    if not 0 <= p.guard_ratio < 1:
        raise UsageError(f"--guard_ratio {p.guard_ratio}: give a share of each user's rows in [0, 1), e.g. 0.1 (0: no guard)")
    if p.workers < 1:
        raise UsageError(f"--workers {p.workers}: give the number of processes that train adapters, >= 1")
    if p.replay_ratio < 0:
        raise UsageError(f"--replay_ratio {p.replay_ratio}: give the replayed rows per own row, >= 0 (e.g. 1.0)")
    samples, errors, replay_pool = _read_rows(data, p)
    for e in errors:
        logger.warning("[data] skipped unreadable record: %s", e)
    by_user: dict[int, list] = defaultdict(list)
    untagged = 0
    for s in samples:
        if "user" in s.extra:
            by_user[int(s.extra["user"])].append(s)
        else:
            untagged += 1
    if untagged:
        logger.warning("[data] %d sample(s) without a `user` column are ignored", untagged)
    wanted = sorted(parse_users(data.users) or by_user)
    missing = [u for u in wanted if len(by_user.get(u, ())) < p.min_user_samples]
    users = [u for u in wanted if u not in missing]
    absent = [u for u in missing if u not in by_user]
    if absent:
        logger.warning("[data] no adapter for user(s) %s: --users %s names them, but %s has no rows of theirs "
                       "(its users: %s)", absent, data.users, data.dataset, sorted(by_user))
    if len(absent) < len(missing):
        logger.warning("[data] no adapter for user(s) %s: fewer than %d sample(s) (--min_user_samples)",
                       [u for u in missing if u in by_user], p.min_user_samples)
    if not users:
        raise UsageError(f"vltune personalize: no user of --users {data.users} has samples in {data.dataset}")

    resuming = wants_resume(args.resume_from_checkpoint)
    if resuming and not resumes_newest(args.resume_from_checkpoint):
        raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: vltune personalize resumes user by "
                         f"user; give true (finished users are kept, a stopped one continues from its newest "
                         f"checkpoint)")
    if p.workers > 1 and len(users) > 1:
        dump_config((model_args, tuner, data, args, p), root / "args.json")
        return _run_workers(root, users, missing, p, replay_pool, resuming)

    t0 = time.time()
    model, processor, described = load_global(model_args, p.base)
    model.train()
    base_path = p.base or described
    checksum = _weights_checksum(model)
    logger.info("[personalize] global model %s loaded once; %d user(s): %s", described, len(users), users)
    dump_config((model_args, tuner, data, args, p), root / "args.json")
    convention = model_family(p.base or resolve_model_path(model_args)).coords

    summary = {"base": base_path, "users": {}, "skipped_users": missing, "kept_global": []}
    for i, user in enumerate(users, 1):
        done = _finished_user(root, user) if resuming else None
        if done is not None:
            summary["users"][user] = done
            if done["adapter"] is None:
                summary["kept_global"].append(user)
            logger.info("[personalize] user %d (%d/%d): finished by the stopped run, kept as it is (%s)", user, i,
                        len(users), done["adapter"] or done["rejected_adapter"])
            continue
        user_dir = root / "adapters" / f"user_{user}"
        user_resume = None
        if resuming and user_dir.is_dir():
            if any(c.complete for c in list_checkpoints(str(user_dir))):
                user_resume = True  # run_sft says which checkpoint it continues from
            else:  # stopped before its first complete checkpoint
                logger.info("[personalize] user %d: the stopped run left no complete checkpoint in %s; trained "
                            "again from the start", user, user_dir)
                shutil.rmtree(user_dir)
        own, val = split_holdout_groups(by_user[user], p.guard_ratio, args.seed + user,
                                        key=lambda s: str(s.images[0]) if s.images else s.where)
        replay = _replay_rows(replay_pool, round(p.replay_ratio * len(own)), args.seed, user)
        logger.info("[personalize] user %d (%d/%d): %d sample(s): %d to train on%s%s", user, i, len(users),
                    len(by_user[user]), len(own), f" + {len(replay)} replayed" if replay else "",
                    f", {len(val)} held out for the guard" if val else "")
        global_val = _click_accuracy(model, processor, val, convention) if val else None
        user_args = replace(args, output_dir=str(user_dir), resume_from_checkpoint=user_resume)
        t_user = time.time()
        result = run_sft(replace(model_args, model=p.base or model_args.model), tuner,
                         replace(data, users=str(user)), user_args, model=model, processor=processor,
                         samples=own + replay)
        peft_model = result.model
        adapter_val = _click_accuracy(peft_model, processor, val, convention) if val else None
        model = peft_model.unload()  # drop this user's LoRA layers: the global weights come back as they were
        if abs(_weights_checksum(model) - checksum) > 1e-6 * max(1.0, abs(checksum)):
            raise RuntimeError(f"user {user}: the global weights changed during personalisation (a bug): "
                               f"adapters trained after this one would start from the wrong model")
        state = Path(result.output_dir) / "trainer_state.json"
        record = {"samples": len(by_user[user]), "trained_on": len(own), "replayed": len(replay),
                  "validation": len(val), "adapter": result.output_dir,
                  "train_loss": result.metrics.get("train_loss"),
                  "steps": json.loads(state.read_text())["global_step"] if state.is_file() else None,
                  "val_accuracy_global": global_val, "val_accuracy_adapter": adapter_val}
        if val and adapter_val < global_val:
            rejected = root / "rejected" / f"user_{user}"
            rejected.parent.mkdir(exist_ok=True)
            shutil.rmtree(rejected, ignore_errors=True)
            shutil.move(result.output_dir, rejected)
            record["adapter"] = None
            record["rejected_adapter"] = str(rejected)
            summary["kept_global"].append(user)
            logger.warning("[personalize] user %d keeps the global model: the adapter scored %.1f%% on the user's "
                           "%d held-out row(s), the global model %.1f%% (adapter kept aside in %s)", user,
                           100 * adapter_val, len(val), 100 * global_val, rejected)
        elif val:
            logger.info("[personalize] user %d: held-out click accuracy %.1f%% (global %.1f%%)", user,
                        100 * adapter_val, 100 * global_val)
        record["seconds"] = round(time.time() - t_user, 1)
        _write_user_record(record)
        summary["users"][user] = record
    summary["total_seconds"] = round(time.time() - t0, 1)
    return _finish(root, summary, users)


def _finish(root: Path, summary: dict, users: list) -> dict:
    """Write personalize.json and the output README, log the closing line; return the summary."""
    (root / "personalize.json").write_text(json.dumps(summary, indent=2))
    (root / "README.md").write_text(
        f"# vltune personalize output\n\n- global model: `{summary['base']}`\n- users: {users}\n"
        f"- adapters: `adapters/user_<id>/` (PEFT LoRA on the global model)\n"
        f"- kept on the global model by the guard (adapter worse on their held-out screens, in `rejected/`): "
        f"{summary['kept_global'] or 'none'}\n\n"
        f"Evaluate: `vltune eval grounding --model {summary['base']} --per_user_adapters {root} --dataset ...`\n")
    logger.info("[personalize] %d adapter(s) in %s%s (%.0f s)", len(users) - len(summary["kept_global"]),
                root / "adapters", f", user(s) {summary['kept_global']} kept on the global model"
                if summary["kept_global"] else "", summary["total_seconds"])
    return summary


def _worker_env(k: int, workers: int) -> dict:
    """Worker k's environment: its share of the CPU threads (unless OMP_NUM_THREADS is set) and, with several
    GPUs, one of them."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = ids[k % len(ids)]
    return env


def _run_workers(root: Path, users: list, skipped: list, p: PersonalizeArguments, replay_pool: list,
                 resuming: bool = False) -> dict:
    """--workers N: N `vltune personalize` processes, worker k on every N-th user still to train from the k-th on,
    each into workers/worker_<k>/ with the resolved arguments of this run (args.json); then their adapters,
    rejected/ and summaries are merged here. Training, the guard and the seeds are per user, so an adapter does
    not depend on which worker trained it. Resuming, the users a stopped run's workers finished are merged first."""
    t0 = time.time()
    wdir = root / "workers"
    finished: dict = {}
    if resuming:  # users the stopped run finished stay as they are; the workers share out the others
        for worker in sorted(wdir.glob("worker_*")) if wdir.is_dir() else ():
            _move_user_dirs(worker, root, finished_only=True)
        finished = {u: rec for u in users if (rec := _finished_user(root, u)) is not None}
        if finished:
            logger.info("[personalize] user(s) %s: finished by the stopped run, kept as they are", list(finished))
    todo = [u for u in users if u not in finished]
    shards = [todo[k::p.workers] for k in range(p.workers) if todo[k::p.workers]]
    # `others` means every user but the whole --users, not but a worker's share: name them for the workers
    replay = p.replay_users or "none"
    if replay.strip().lower() == "others":
        replay = ",".join(str(u) for u in sorted({int(s.extra["user"]) for s in replay_pool})) or "none"
    shutil.rmtree(wdir, ignore_errors=True)
    wdir.mkdir()
    procs = []
    for k, shard in enumerate(shards):
        log = wdir / f"worker_{k}.log"
        cmd = [sys.executable, "-m", "vltune", "personalize", "--config", str(root / "args.json"),
               "--users", ",".join(map(str, shard)), "--replay_users", replay, "--workers", "1",
               "--output_dir", str(wdir / f"worker_{k}")]
        with open(log, "w") as f:
            procs.append((k, log, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   env=_worker_env(k, len(shards)))))
        logger.info("[personalize] worker %d: user(s) %s (log: %s)", k, shard, log)
    failed = []
    for k, log, proc in procs:
        if proc.wait() != 0:
            failed.append((k, log))
        else:
            logger.info("[personalize] worker %d done (%.0f s)", k, time.time() - t0)
    if failed:
        tail = "\n".join(failed[0][1].read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"personalize worker(s) {[k for k, _ in failed]} failed (logs: "
                           f"{', '.join(str(log) for _, log in failed)}; --resume_from_checkpoint true keeps the "
                           f"users they finished); the end of worker {failed[0][0]}'s:\n{tail}")
    summary: dict = {"base": p.base, "users": {str(u): rec for u, rec in finished.items()}, "skipped_users": skipped,
                     "kept_global": [u for u, rec in finished.items() if rec["adapter"] is None],
                     "workers": len(shards)}
    for k, _log, _proc in procs:
        part_dir = wdir / f"worker_{k}"
        part = json.loads((part_dir / "personalize.json").read_text())
        summary["base"] = part["base"]
        _move_user_dirs(part_dir, root)
        for user, record in part["users"].items():
            for key in ("adapter", "rejected_adapter"):  # .../worker_<k>/<sub>/user_<id> -> root/<sub>/user_<id>
                if record.get(key):
                    where = Path(record[key])
                    record[key] = str(root / where.parent.name / where.name)
            _write_user_record(record)  # its copy in the user's directory says where that directory is now
            summary["users"][user] = record
        summary["kept_global"] += part["kept_global"]
        shutil.rmtree(part_dir)
    summary["users"] = {u: summary["users"][str(u)] for u in users}
    summary["kept_global"] = sorted(summary["kept_global"])
    summary["total_seconds"] = round(time.time() - t0, 1)
    return _finish(root, summary, users)


def main(argv: list[str] | None = None) -> dict:
    model_args, tuner, data, args, p = parse_args(
        (ModelArguments, TunerArguments, SFTDataArguments, SFTTrainingArguments, PersonalizeArguments), argv,
        prog="vltune personalize", description=__doc__)
    return run_personalize(model_args, tuner, data, args, p)
