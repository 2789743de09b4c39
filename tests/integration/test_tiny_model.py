"""The embedded tiny model's first build says what it builds, shows progress, and is then reused."""

import logging

from vltune.models import tiny


def test_first_build_of_the_s_model_says_what_it_builds_and_shows_progress(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("VLTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny, "PRETRAIN_STEPS", 3)
    with caplog.at_level(logging.INFO, logger="vltune"):
        path = tiny.tiny_model_path("qwen3_vl", "s")
    log = caplog.text
    assert "building the embedded tiny qwen3_vl-s model" in log and "pretraining its vision tower" in log
    assert "built the tiny qwen3_vl-s model in" in log
    err = capsys.readouterr().err
    assert "pretraining the tiny vision tower" in err and "3/3" in err  # the tqdm bar on stderr
    assert (tmp_path / "tiny").is_dir() and path.startswith(str(tmp_path))

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vltune"):
        assert tiny.tiny_model_path("qwen3_vl", "s") == path  # cached: no second build, no message
    assert "building" not in caplog.text
