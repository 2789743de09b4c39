"""A dirty data set (issue 16 item 7): every fault kind `vltune data check` knows, some images corrupt only past
their header. data check and sft must count them exactly, per kind, and sft must train to the end of the epoch.
The full-size drill (20,000 samples, 2% broken, peak RSS at start and end) is benchmarks/dirty_run.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from vltune.data.synthetic_faults import FAULTS, expected_counts, make_dirty_gui_set

ROOT = Path(__file__).resolve().parents[2]


def test_every_fault_kind_is_counted_exactly_and_the_epoch_runs_to_the_end(tmp_path, processor_for):
    from vltune.data.check import check_data
    from vltune.recipes.sft import main as sft_main

    n = 500
    manifest = make_dirty_gui_set(tmp_path / "data", n, rate=len(FAULTS) / n, max_length=256)  # each variant once
    expected = expected_counts(manifest)
    assert {f.stage for f in FAULTS} == {"read", "check", "load", "data check"}

    summary = check_data([manifest["train"]], processor_for("qwen3_vl"), max_length=256, num_proc=1)
    assert dict(summary.counts) == expected["data_check"]

    out = tmp_path / "run"
    sft_main(["--model_family", "qwen3_vl", "--train_type", "lora", "--dataset", manifest["train"],
              "--output_dir", str(out), "--max_length", "256", "--per_device_train_batch_size", "32",
              "--num_train_epochs", "1", "--gradient_checkpointing", "false",
              "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none"])
    report = json.loads((out / "data_report.json").read_text())
    assert report["skipped"] == expected["sft_skipped"]
    assert report["skipped_at_load"] == expected["sft_at_load"]  # (from DataLoader workers: the unit test)
    load_lines = sorted(f"{manifest['train']}:{f['line']}" for f in manifest["faults"] if f["stage"] == "load")
    assert sorted(e["where"] for e in report["at_load"]) == load_lines
    skipped = sum(expected["sft_skipped"].values())
    assert report["total"] == n and report["kept"] == n - skipped

    passed_check = n - skipped + len(load_lines)  # the epoch's length: load-time failures are replaced
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == math.ceil(passed_check / 32)
    log = (out / "train.log").read_text()
    assert (f"{n} samples read, {n - skipped} kept, {skipped} skipped ({len(load_lines)} of them at load time)"
            in log)
    for when in ("train start", "after the first step", "train end"):
        assert f"[memory] {when}" in log


@pytest.mark.slow
@pytest.mark.drills
@pytest.mark.timeout(1800)  # the subprocess's own limit; the suite's 600 s cut it off beside other work
def test_dirty_run_drill_20k(tmp_path):
    """benchmarks/dirty_run.py at full size: 20,000 samples, 2% broken, one epoch; a few minutes on 2 cores."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dirty_run.py"), "--out", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
