#!/usr/bin/env bash
# Runs that survive (issue 16): every kill -9 / resume drill (tests/integration/test_drills.py, marker `drills`)
# and the survival tests (tests/integration/test_survive.py: torn checkpoints, a full disk, SIGTERM / Ctrl-C,
# non-finite losses, reused output directories, VLA resume), then prints one table: what each did, whether it
# held, and its figures. CPU only, offline, on the embedded tiny models; about 15-20 minutes on 2 cores.
#
#   bash benchmarks/drills.sh            # VLTUNE_DRILL_SEED=N fixes the random kill steps
set -uo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export VLTUNE_DRILL_REPORT="$work/drills.jsonl" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python -m pytest -q -p no:randomly -m "drills or not drills" tests/integration/test_drills.py \
    tests/integration/test_survive.py "tests/integration/test_vla.py::test_resume_continues_with_the_same_losses_and_weights" \
    --junitxml="$work/junit.xml" -o junit_family=xunit1 >"$work/pytest.log" 2>&1
status=$?
tail -n 3 "$work/pytest.log"

python - "$work" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

work = Path(sys.argv[1])
records = [json.loads(line) for line in (work / "drills.jsonl").read_text().splitlines()] \
    if (work / "drills.jsonl").exists() else []
rows = []
for r in records:
    did = (f"SIGKILL during the save of {r['torn_checkpoint']}" if r["torn_checkpoint"]
           else f"SIGKILL at step {r['killed_after_step']}") + f", resumed from checkpoint-{r['resumed_from']}"
    diff = "n/a" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
    rows.append((r["drill"], did, "yes" if r["held"] else "NO",
                 f"{r['steps_compared']} later steps, max |d loss| {diff}, weights equal: {r['weights_equal']}"))
tree = ET.parse(work / "junit.xml")
for case in tree.iter("testcase"):
    if "test_drills" in case.get("classname", ""):
        continue  # reported above with its figures
    failed = case.find("failure") is not None or case.find("error") is not None
    skipped = case.find("skipped") is not None
    name = case.get("name").removeprefix("test_").replace("_", " ")
    rows.append((name[:60], case.get("classname").rsplit(".", 1)[-1], "skipped" if skipped else "NO" if failed else "yes",
                 f"{float(case.get('time', 0)):.0f} s"))
widths = [max(len(str(row[i])) for row in rows + [("drill", "what was done", "held", "figures")]) for i in range(4)]
for row in [("drill", "what was done", "held", "figures"), tuple("-" * w for w in widths), *rows]:
    print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
EOF
exit $status
