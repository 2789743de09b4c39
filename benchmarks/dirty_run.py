"""Drill: a long, dirty run (issue 16 item 7). Not part of the default tests; tests/integration/test_dirty_run.py
runs a 500-sample version in the default suite and this script's full size under `-m drills`.

1. Writes a GUI grounding set in ms-swift JSONL + PNG files (`vltune.data.synthetic_faults`) of --samples rows,
   --rate of them broken, spread over every fault variant: every problem kind `vltune data check` knows, some
   images broken only past their header (they pass the check before training and fail when decoded).
2. `vltune data check` on it: its counts per kind must equal the injected ones.
3. `vltune sft` (embedded tiny Qwen3-VL, LoRA, one epoch, every kept sample seen once) trains on it to the
   end. data_report.json and train.log must count every fault the training checks (all but the grounding
   boxes) exactly, per kind, with the decode-time ones under `skipped_at_load`; the steps must be one epoch.
4. Memory: the run logs `[memory]` lines (current and peak RSS) at train start, after the first step and at
   the end, and this script polls the process's VmRSS / VmHWM. The RSS at the end may exceed the RSS after
   the first step by at most --rss_tolerance_mib (default 64 MiB: the first step allocates what later
   steps reuse; what remains is allocator noise of a few tens of MiB, while a per-step or per-sample leak
   over hundreds of steps grows far past it).

Prints a table of the figures and writes them to OUT/dirty_run.json; exits 1 if anything did not hold.

    python benchmarks/dirty_run.py                          # 20,000 samples, 2% broken (~3-5 min on 2 cores)
    python benchmarks/dirty_run.py --samples 500 --rate 0.05 --out output/dirty_small
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _status_mib(pid: int) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) of `pid` in MiB from /proc, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M))
    if len(fields) < 2:
        return None
    return int(fields["VmRSS"]) / 1024, int(fields["VmHWM"]) / 1024


def run_polled(cmd: list[str], log: Path, interval: float = 0.5) -> dict:
    """Run `cmd` (stdout + stderr to `log`), polling its memory; the samples are tagged with the training
    phase read from its own `[memory]` lines (before / train / after)."""
    samples: list[tuple[float, str, float, float]] = []
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)

        def poll():
            while proc.poll() is None:
                mem = _status_mib(proc.pid)
                if mem:
                    text = log.read_text(errors="replace")
                    phase = ("after" if "[memory] train end" in text else
                             "train" if "[memory] after the first step" in text else "before")
                    samples.append((time.perf_counter() - t0, phase, *mem))
                time.sleep(interval)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        rc = proc.wait()
        poller.join()
    return {"rc": rc, "wall_s": time.perf_counter() - t0, "samples": samples}


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def parse_log(text: str) -> dict:
    """The figures vltune sft logs: [memory] lines, the [data] summary lines and their per-kind counts."""
    memory = {}
    for when, rss, peak in re.findall(r"\[memory\] (train start|after the first step|train end)[^:]*: "
                                      r"RSS (\d+) MiB, peak RSS (\d+) MiB", text):
        memory[when] = {"rss_mib": int(rss), "peak_mib": int(peak)}
    blocks = {}
    # "[data] train: ..." (before training) and "[data] train (final, ...): ..." (after), each followed by
    # "[data]   <kind>: <n> sample(s)" lines
    for m in re.finditer(r"\[data\] (train(?: \(final[^)]*\))?): (\d+) samples read, (\d+) kept, (\d+) skipped"
                         r"(?: \((\d+) of them at load time\))?\n((?:.*\[data\]   .*\n|.*\[data\]       .*\n)*)", text):
        kinds = {k: int(n) for k, n in re.findall(r"\[data\]   ([^:\n]+): (\d+) sample\(s\)", m.group(6))}
        blocks["final" if "final" in m.group(1) else "before"] = {
            "read": int(m.group(2)), "kept": int(m.group(3)), "skipped": int(m.group(4)),
            "at_load": int(m.group(5) or 0), "kinds": kinds}
    load_lines = re.findall(r"\[data\] skipping sample at load time: (\S+?:\d+): ", text)
    return {"memory": memory, "data": blocks, "load_skip_lines": load_lines}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=0.02, help="share of broken samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "output" / "dirty_run"))
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1, help="--dataloader_num_workers (decoding happens there)")
    ap.add_argument("--rss_tolerance_mib", type=float, default=64.0)
    args = ap.parse_args(argv)

    from vltune.data.synthetic_faults import FAULTS, expected_counts, make_dirty_gui_set

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    manifest = make_dirty_gui_set(out / "data", args.samples, args.rate, args.seed, args.max_length)
    gen_s = time.perf_counter() - t0
    expected = expected_counts(manifest)
    train = manifest["train"]
    checks: list[tuple[str, bool, str]] = []

    def check(what: str, ok: bool, detail: str = "") -> None:
        checks.append((what, bool(ok), detail))

    # ---- vltune data check
    report = out / "check.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vltune", "data", "check", "--dataset", train,
                           "--model_family", "qwen3_vl", "--max_length", str(args.max_length),
                           "--report", str(report)], env=_env(), cwd=ROOT, capture_output=True, text=True)
    check_s = time.perf_counter() - t0
    (out / "check.log").write_text(proc.stdout + proc.stderr)
    found = json.loads(report.read_text())["problems"] if report.exists() else {}
    check("data check exits 1 (problems found), no traceback", proc.returncode == 1 and "Traceback" not in proc.stderr,
          f"rc {proc.returncode}")
    check("data check counts == injected, per kind", found == expected["data_check"],
          f"{found} vs {expected['data_check']}")

    # ---- vltune sft
    run_dir = out / "sft"
    cmd = [sys.executable, "-m", "vltune", "sft", "--model_family", "qwen3_vl", "--train_type", "lora",
           "--dataset", train, "--output_dir", str(run_dir), "--max_length", str(args.max_length),
           "--per_device_train_batch_size", str(args.batch_size), "--num_train_epochs", "1",
           "--dataloader_num_workers", str(args.workers), "--gradient_checkpointing", "false",
           "--logging_steps", "20", "--save_strategy", "no", "--report_to", "none", "--seed", str(args.seed)]
    run = run_polled(cmd, out / "sft.log")
    log_text = (out / "sft.log").read_text(errors="replace")
    check("sft exits 0, no traceback", run["rc"] == 0 and "Traceback" not in log_text, f"rc {run['rc']}")
    data_report = json.loads((run_dir / "data_report.json").read_text()) if (run_dir / "data_report.json").exists() else {}
    skipped = data_report.get("skipped", {})
    at_load = data_report.get("skipped_at_load", {})
    check("data_report.json skipped == injected (all but boxes), per kind", skipped == expected["sft_skipped"],
          f"{skipped} vs {expected['sft_skipped']}")
    check("data_report.json skipped_at_load == injected decode-time faults", at_load == expected["sft_at_load"],
          f"{at_load} vs {expected['sft_at_load']}")
    load_where = sorted(e["where"] for e in data_report.get("at_load", []))
    want_where = sorted(f"{train}:{f['line']}" for f in manifest["faults"] if f["stage"] == "load")
    check("data_report.json at_load lists exactly the decode-time lines", load_where == want_where,
          f"{len(load_where)} listed, {len(want_where)} injected")
    n_skipped = sum(expected["sft_skipped"].values())
    check("data_report.json total / kept", data_report.get("total") == args.samples
          and data_report.get("kept") == args.samples - n_skipped,
          f"total {data_report.get('total')}, kept {data_report.get('kept')}")
    train_log = run_dir / "train.log"  # the run's own log (the console, teed)
    parsed = parse_log(train_log.read_text(errors="replace") if train_log.exists() else "")
    final = parsed["data"].get("final", {})
    check("train.log final [data] counts == injected, per kind", final.get("kinds") == expected["sft_skipped"]
          and final.get("skipped") == n_skipped and final.get("at_load") == sum(expected["sft_at_load"].values()),
          f"{final}")
    check("each decode-time sample warned once", sorted(parsed["load_skip_lines"]) == want_where,
          f"{len(parsed['load_skip_lines'])} warnings")
    state = json.loads((run_dir / "trainer_state.json").read_text()) if (run_dir / "trainer_state.json").exists() else {}
    checked_ok = args.samples - (n_skipped - sum(expected["sft_at_load"].values()))  # kept before training
    steps_want = math.ceil(checked_ok / args.batch_size)
    check("one full epoch", state.get("global_step") == steps_want, f"{state.get('global_step')} vs {steps_want}")

    memory = parsed["memory"]
    first, end = memory.get("after the first step", {}), memory.get("train end", {})
    growth = end.get("rss_mib", math.inf) - first.get("rss_mib", 0)
    polled = [s for s in run["samples"] if s[1] == "train"]
    k = max(1, len(polled) // 10)
    early, late = _median([s[2] for s in polled[:k]]), _median([s[2] for s in polled[-k:]])
    polled_growth = (late - early) if early is not None else None
    check(f"RSS flat: end - after first step <= {args.rss_tolerance_mib:g} MiB", growth <= args.rss_tolerance_mib,
          f"{growth:+.0f} MiB (logged), {polled_growth if polled_growth is None else f'{polled_growth:+.0f}'} MiB "
          f"(polled, first vs last tenth of training)")
    peak_growth = end.get("peak_mib", math.inf) - first.get("peak_mib", 0)
    check(f"peak RSS flat: end - after first step <= {args.rss_tolerance_mib:g} MiB",
          peak_growth <= args.rss_tolerance_mib, f"{peak_growth:+.0f} MiB")

    # ---- table
    by_kind_lines = []
    kinds = sorted(expected["data_check"], key=lambda k: -expected["data_check"][k])
    for kind in kinds:
        variants = sorted({f["name"] for f in manifest["faults"] if f["kind"] == kind})
        by_kind_lines.append((kind, expected["data_check"][kind], found.get(kind, 0),
                              expected["sft_skipped"].get(kind, 0), skipped.get(kind, 0), at_load.get(kind, 0),
                              len(variants)))
    train_s = None
    m = re.search(r"'train_runtime': '([\d.]+)'", log_text)
    if m:
        train_s = float(m.group(1))
    figures = {
        "samples": args.samples, "broken": manifest["broken"], "variants": len(FAULTS),
        "generate_s": round(gen_s, 1), "data_check_s": round(check_s, 1), "sft_wall_s": round(run["wall_s"], 1),
        "train_runtime_s": train_s, "steps": state.get("global_step"), "batch_size": args.batch_size,
        "workers": args.workers, "memory": memory, "polled_rss_train_first_tenth_mib": early,
        "polled_rss_train_last_tenth_mib": late,
        "polled_peak_mib": max((s[3] for s in run["samples"]), default=None),
        "expected": expected, "data_check_found": found, "sft_skipped": skipped, "sft_skipped_at_load": at_load,
        "checks": [{"what": w, "held": ok, "detail": d} for w, ok, d in checks],
    }
    (out / "dirty_run.json").write_text(json.dumps(figures, indent=2))

    print(f"\ndirty run: {args.samples} samples, {manifest['broken']} broken ({args.rate:.1%}) over "
          f"{len(FAULTS)} variants, seed {args.seed}; output in {out}")
    print(f"{'kind':28} {'injected':>8} {'data check':>10} {'sft expects':>11} {'sft counted':>11} {'at load':>7}")
    for kind, inj, dc, want, got, late_n, _ in by_kind_lines:
        print(f"{kind:28} {inj:8d} {dc:10d} {want:11d} {got:11d} {late_n:7d}")
    print(f"{'total':28} {manifest['broken']:8d} {sum(found.values()):10d} {n_skipped:11d} "
          f"{sum(skipped.values()):11d} {sum(at_load.values()):7d}")
    print("(box faults: data check counts them; sft keeps those samples, training does not read boxes)")
    print(f"steps {state.get('global_step')} (batch {args.batch_size}, 1 epoch), generate {gen_s:.0f} s, data check "
          f"{check_s:.0f} s, sft wall {run['wall_s']:.0f} s (train_runtime {train_s} s)")
    for when in ("train start", "after the first step", "train end"):
        if when in memory:
            print(f"[memory] {when:22} RSS {memory[when]['rss_mib']:5d} MiB   peak RSS {memory[when]['peak_mib']:5d} MiB")
    if early is not None:
        print(f"polled RSS during training: first tenth {early:.0f} MiB, last tenth {late:.0f} MiB, "
              f"peak {figures['polled_peak_mib']:.0f} MiB ({len(polled)} samples)")
    print()
    for what, ok, detail in checks:
        print(f"{'held  ' if ok else 'FAILED'} {what}" + (f"  [{detail}]" if not ok or "RSS" in what else ""))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
