"""Helpers the tests share (plain functions and constants; fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

FAMILIES = ("qwen3_vl", "qwen2_5_vl", "qwen2_vl", "idefics3")


def write_image(path: Path, color=(200, 30, 30), size=(64, 64)) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def packing_rows() -> list[dict]:
    """Three chat rows of different lengths for the packing tests: one image, two images + an untrained turn,
    text only."""
    from PIL import Image

    red, green, blue = (Image.new("RGB", s, c) for s, c in (((64, 64), (200, 0, 0)), ((96, 64), (0, 200, 0)),
                                                            ((64, 128), (0, 0, 200))))
    return [
        {"messages": [{"role": "user", "content": "<image>Click the red circle"},
                      {"role": "assistant", "content": "click(125, 375)"}], "images": [red]},
        {"messages": [{"role": "user", "content": "<image>compare with <image>"},
                      {"role": "assistant", "content": "not trained here", "loss": False},
                      {"role": "user", "content": "and now?"},
                      {"role": "assistant", "content": "a longer answer of several words"}], "images": [green, blue]},
        {"messages": [{"role": "user", "content": "text only"}, {"role": "assistant", "content": "ok"}], "images": []},
    ]


def packing_features(rows: list[dict]) -> list[dict]:
    """The collator's input for `rows` (what SFTDataset yields)."""
    from vltune.data.formats import normalize_row

    return [{"sample": normalize_row(r, None, f"t:{i}"), "images": list(r["images"])} for i, r in enumerate(rows)]


def grounding_report(samples, answers: dict[str, list[str]], convention: str = "rel1000", **extra):
    """(report, predictions) as `vltune eval grounding` builds them, from given answers per setup (no model):
    the records of vltune.eval.grounding.score_samples and its breakdown per setup."""
    from vltune.eval.grounding import breakdown, score_samples, user_gains

    predictions = {name: score_samples(samples, a, convention, None) for name, a in answers.items()}
    setups = {n: breakdown(r) for n, r in predictions.items()}
    gains = {n: user_gains(setups["global"], s) for n, s in setups.items() if "global" in setups
             and n not in ("global", "zero-shot")}
    report = {"model": "hand-made", "dataset": ["test.jsonl"], "users": None, "coordinates": convention,
              "n_samples": len(samples), "setups": setups, "gains": gains, **extra}
    return report, predictions


@contextlib.contextmanager
def headless_chromium(window: tuple[int, int] = (1200, 900)):
    """A selenium driver on Debian's headless chromium + chromium-driver; skips the test when either (or
    selenium) is missing (.ci/run installs them with apt-get)."""
    import shutil
    import tempfile

    import pytest

    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("no Debian chromium + chromium-driver here (.ci/run installs them with apt-get)")
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="vltune-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service(driver_bin), options=options)
        try:
            inner = browser.execute_script("return [window.innerWidth, window.innerHeight]")
            if inner != list(window):  # --window-size counts the window's frame: make the page area that size
                browser.set_window_size(2 * window[0] - inner[0], 2 * window[1] - inner[1])
            yield browser
        finally:
            browser.quit()
