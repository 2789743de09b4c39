"""One results table (markdown + JSON) from the rows of benchmarks/vla_mt10.sh.

    python benchmarks/vla_results.py WORKDIR NAME=DESCRIPTION [NAME=DESCRIPTION ...]

Each NAME is a policy directory under WORKDIR with eval/eval_report.json (`vltune eval vla`) and
train_results.json (`vltune vla`); WORKDIR/times.txt holds "step seconds" lines written by the script.
Writes WORKDIR/results.md and WORKDIR/results.json and prints the markdown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _short(task: str) -> str:
    return task.removesuffix("-v3")


def collect(workdir: Path, rows: list[tuple[str, str]]) -> dict:
    times = {}
    if (workdir / "times.txt").exists():
        for line in (workdir / "times.txt").read_text().splitlines():
            if line.strip():
                name, sec = line.rsplit(" ", 1)
                times[name] = int(sec)
    wall = times.pop("wall", None)  # the script's own elapsed seconds (rows run in parallel)
    out = {"rows": [], "times_s": times, "steps_sum_s": sum(times.values()), "wall_s": wall}
    for name, desc in rows:
        report_file = workdir / name / "eval" / "eval_report.json"
        if not report_file.exists():
            raise SystemExit(f"{report_file}: missing; run the row's `vltune eval vla` first")
        report = json.loads(report_file.read_text())
        train = json.loads((workdir / name / "train_results.json").read_text())
        out["rows"].append({
            "name": name, "description": desc, "state": report.get("state"),
            "privileged_state": bool(report.get("privileged_state")), "cameras": report.get("cameras"),
            "success": {t["task"]: t["success_rate"] for t in report["tasks"]},
            "successes": {t["task"]: f"{t['successes']}/{t['episodes']}" for t in report["tasks"]},
            "mean_success_length": {t["task"]: t["mean_success_length"] for t in report["tasks"]},
            "mean_success_rate": report["mean_success_rate"],
            "episodes_per_task": report["args"]["episodes"], "step_budget": report["args"]["max_episode_steps"],
            "train_seconds": train.get("train_wall_seconds"), "eval_seconds": report.get("seconds"),
            "latency_p50_ms": report["latency"]["p50_ms"], "val_loss": train.get("eval_loss")})
    return out


def markdown(res: dict) -> str:
    rows = res["rows"]
    tasks = list(rows[0]["success"]) if rows else []
    first = rows[0] if rows else {}
    lines = [(f"Success within {first.get('step_budget')} steps, {first.get('episodes_per_task')} held-out "
              "episodes per task (fresh positions, never a demo's)."), "",
             "| row | state | " + " | ".join(_short(t) for t in tasks) + " | mean | train s | eval s |",
             "|---|---|" + "---|" * len(tasks) + "---|---|---|"]
    for r in rows:
        state = r["state"] + (" (PRIVILEGED)" if r["privileged_state"] else "")
        cells = [f"{100 * r['success'][t]:.0f}%" for t in tasks]
        lines.append(f"| {r['description']} | {state} | " + " | ".join(cells) +
                     f" | **{100 * r['mean_success_rate']:.1f}%** | {r['train_seconds']} | {r['eval_seconds']} |")
    t = res["times_s"]
    wall = res["wall_s"]
    lines += ["", "Seconds per step of the script: " + ", ".join(f"{k} {v}" for k, v in t.items()) +
              f"; their sum {res['steps_sum_s']} s ({res['steps_sum_s'] / 60:.1f} min)" +
              ("" if wall is None else f"; the whole script {wall} s wall ({wall / 60:.1f} min), rows in parallel") +
              ".", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        raise SystemExit(__doc__)
    workdir = Path(argv[0])
    res = collect(workdir, [tuple(a.split("=", 1)) for a in argv[1:]])
    md = markdown(res)
    (workdir / "results.json").write_text(json.dumps(res, indent=1))
    (workdir / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main(sys.argv[1:])
