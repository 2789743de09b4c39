"""Virtual environments for the peer tools (ms-swift, LLaMA-Factory), built on demand.

Each peer pins its own transformers range, so each lives in its own venv under
`root` (default /tmp/vltune-bench/venvs). `torch==2.13.0` is pinned in the same pip
command (on this kind of machine that is the CPU build on local disk; unpinned, the
peers' torchvision/torchaudio requirements pull a multi-GB CUDA torch), and
torchvision/torchaudio are uninstalled afterwards (they do not load beside the CPU
torch 2.13.0). A venv is reused when its marker file matches the spec.

    python benchmarks/peer_envs.py [--root DIR] [swift] [llamafactory]   # build only
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ROOT = Path(os.environ.get("VLTUNE_BENCH_VENVS", "/tmp/vltune-bench/venvs"))

SPECS = {
    "swift": {
        "install": ["torch==2.13.0", "ms-swift==4.6.0", "qwen-vl-utils"],
        "uninstall": ["torchvision", "torchaudio"],
        "check": "import swift, transformers, torch; print('ms-swift', swift.__version__, 'transformers', "
                 "transformers.__version__, 'torch', torch.__version__)",
        "cli": "swift",
        # imported at the top of these modules, used only for video/audio: stubbed while they import
        "stub_modules": "qwen_vl_utils.vision_process:torchvision",
    },
    "llamafactory": {
        "install": ["torch==2.13.0", "llamafactory==0.9.5"],
        # torchaudio: no release for torch 2.13 (2.11.0 is pulled and fails to load its library).
        "uninstall": ["torchvision", "torchaudio"],
        "check": "import llamafactory, transformers, torch; print('llamafactory', llamafactory.__version__, "
                 "'transformers', transformers.__version__, 'torch', torch.__version__)",
        "cli": "llamafactory-cli",
        "stub_modules": "llamafactory.data.mm_plugin:torchaudio,llamafactory.data.mm_plugin:torchvision",
    },
}


def _spec_hash(spec: dict) -> str:
    built = {k: spec[k] for k in ("install", "uninstall")}  # what changes the venv's content
    return hashlib.sha1(json.dumps(built, sort_keys=True).encode()).hexdigest()[:12]


def venv_python(name: str, root: Path = DEFAULT_ROOT) -> Path:
    return Path(root) / name / "bin" / "python"


def ensure_venv(name: str, root: Path = DEFAULT_ROOT, log=print) -> tuple[Path | None, str]:
    """Build (or reuse) the venv of peer `name`; return (python, versions line) or (None, reason)."""
    spec = SPECS[name]
    root = Path(root)
    venv = root / name
    marker = venv / ".vltune_bench_ready"
    py = venv_python(name, root)
    if marker.exists() and marker.read_text().strip() == _spec_hash(spec) and py.exists():
        ok, out = _run([str(py), "-c", spec["check"]], None)
        if ok:
            return py, out.strip().splitlines()[-1]
    root.mkdir(parents=True, exist_ok=True)
    logf = root / f"{name}-install.log"
    log(f"[venv] building {venv} ({' '.join(spec['install'])}); log: {logf}")
    t0 = time.time()
    nice = ["nice", "-n", "15"]  # keep the machine usable while pip unpacks and byte-compiles
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        nice + [str(py), "-m", "pip", "install", "--upgrade", "pip"],
        nice + [str(py), "-m", "pip", "install", *spec["install"]],
    ]
    for cmd in steps:
        ok, out = _run(cmd, logf)
        if not ok:
            return None, f"`{' '.join(cmd[-4:])}` failed (see {logf}): {_last_line(out)}"
    _run([str(py), "-m", "pip", "uninstall", "-y", *spec["uninstall"]], logf)
    ok, out = _run([str(py), "-c", spec["check"]], logf)
    if not ok:
        return None, f"the venv was built but `{spec['check'][:40]}...` fails (see {logf}): {_last_line(out)}"
    marker.write_text(_spec_hash(spec) + "\n")
    log(f"[venv] {name} ready in {time.time() - t0:.0f} s: {out.strip().splitlines()[-1]}")
    return py, out.strip().splitlines()[-1]


def _run(cmd: list[str], logf: Path | None) -> tuple[bool, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    if logf is not None:
        with open(logf, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n{out}\n[exit {proc.returncode}]\n")
    return proc.returncode == 0, out


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--root", default=str(DEFAULT_ROOT))
    a = ap.parse_args()
    for n in a.names:
        py, msg = ensure_venv(n, Path(a.root))
        print(f"{n}: {'OK ' + str(py) if py else 'FAILED'}: {msg}")
