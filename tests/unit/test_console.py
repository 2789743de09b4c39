"""TeeLog and the vltune logger: the console goes to train.log too, and every stream is put back exactly."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from vltune.console import TeeLog, logger, setup_logging


@pytest.fixture
def streams(monkeypatch):
    """Our own stdout/stderr. Set lazily inside the test body: pytest re-installs its capture streams between the
    fixture's setup and the test call."""
    out, err = io.StringIO(), io.StringIO()

    def install():
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        return out, err

    return install


def test_console_and_logger_reach_the_file_and_streams_come_back(streams, tmp_path):
    out, err = streams()
    setup_logging()
    with TeeLog(tmp_path / "train.log"):
        print("to stdout")
        logger.warning("to the logger")
    assert sys.stdout is out and sys.stderr is err
    text = (tmp_path / "train.log").read_text()
    assert "to stdout" in text and "to the logger" in text
    assert "to stdout" in out.getvalue() and "to the logger" in err.getvalue()
    logger.warning("after the run")  # the handler follows the current sys.stderr, not the ended tee
    assert "after the run" in err.getvalue() and "after the run" not in (tmp_path / "train.log").read_text()


def test_an_exception_inside_restores_the_streams(streams, tmp_path):
    out, err = streams()
    with pytest.raises(RuntimeError, match="boom"):
        with TeeLog(tmp_path / "train.log"):
            print("before the error")
            raise RuntimeError("boom")
    assert sys.stdout is out and sys.stderr is err
    assert "before the error" in (tmp_path / "train.log").read_text()


def test_nested_tees_restore_in_order(streams, tmp_path):
    out, err = streams()
    with TeeLog(tmp_path / "outer.log"):
        outer_stdout = sys.stdout
        with TeeLog(tmp_path / "inner.log"):
            print("inner")
        assert sys.stdout is outer_stdout
        print("outer only")
    assert sys.stdout is out and sys.stderr is err
    assert "inner" in (tmp_path / "inner.log").read_text() and "inner" in (tmp_path / "outer.log").read_text()
    assert "outer only" not in (tmp_path / "inner.log").read_text()


def test_a_stream_swapped_meanwhile_is_left_to_its_owner(streams, tmp_path):
    out, err = streams()
    theirs = io.StringIO()
    with TeeLog(tmp_path / "train.log"):
        sys.stdout = theirs  # someone else redirects stdout inside the run and does not put it back
    assert sys.stdout is theirs, "TeeLog must not clobber a stream it did not install"
    assert sys.stderr is err
    sys.stdout = out


def test_setup_logging_adds_one_handler_per_process():
    setup_logging()
    setup_logging()
    ours = [h for h in logger.handlers if type(h).__name__ == "_CurrentStderrHandler"]
    assert len(ours) == 1 and logger.propagate is False
    assert isinstance(ours[0], logging.StreamHandler)
