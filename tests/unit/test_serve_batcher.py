"""vltune serve's batcher: how concurrent requests are gathered into generate calls (no model: a fake engine
records the rows of each call)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from vltune.serve.batcher import Batcher
from vltune.serve.engine import Job


class _Gauge:
    def set(self, value):
        pass


class _Metrics:
    queue_depth = adapters_loaded = _Gauge()

    def observe_batch(self, rows, tokens, seconds):
        pass


class _Engine:
    """Records the jobs of every call; each call takes `seconds`."""

    def __init__(self, seconds: float = 0.05):
        self.seconds, self.calls = seconds, []
        self.pool = SimpleNamespace(loaded=[])

    def run(self, jobs):
        self.calls.append([j.sample for j in jobs])
        time.sleep(self.seconds)
        return [(len(jobs), 0, self.seconds)]


def _client(batcher: Batcher, name: str, rounds: int, answered: list):
    """A client that sends its next request as soon as its last one is answered (an agent loop)."""
    for r in range(rounds):
        done = threading.Event()
        batcher.submit(Job(sample=f"{name}/{r}", adapter=None, max_tokens=1), lambda job, err: done.set())
        assert done.wait(10)
        answered.append(time.monotonic())
        time.sleep(0.002 * (hash(name) % 5))  # clients do not come back all at the same instant


def _run(clients: int, rounds: int, regather_ms: float, engine_s: float = 0.05):
    engine = _Engine(engine_s)
    batcher = Batcher(engine, _Metrics(), max_batch_size=16, max_batch_wait_ms=0, regather_wait_ms=regather_ms)
    batcher.start()
    answered: list = []
    threads = [threading.Thread(target=_client, args=(batcher, f"c{i}", rounds, answered)) for i in range(clients)]
    try:
        # clients start staggered, as real ones do: without regathering they settle into two cohorts
        for t in threads:
            t.start()
            time.sleep(engine_s / 3)
        for t in threads:
            t.join(30)
    finally:
        batcher.stop()
    return engine.calls


def test_concurrent_clients_are_regathered_into_one_batch():
    calls = _run(clients=6, rounds=8, regather_ms=100)
    sizes = [len(c) for c in calls]
    # after the staggered start the six clients share every call (until the first ones are done), and no
    # client is in a call twice
    assert sizes.count(6) >= 4, sizes
    assert all(len({s.split("/")[0] for s in c}) == len(c) for c in calls)


def test_without_regathering_the_clients_stay_split():
    sizes = [len(c) for c in _run(clients=6, rounds=8, regather_ms=0)]
    assert sizes.count(6) < len(sizes) // 2, sizes  # what regathering is for: the same load in smaller, more calls


def test_a_lone_client_never_waits_for_regathering():
    engine = _Engine(0.0)
    batcher = Batcher(engine, _Metrics(), max_batch_size=16, max_batch_wait_ms=0, regather_wait_ms=5000)
    batcher.start()
    try:
        for r in range(5):
            done = threading.Event()
            t = time.monotonic()
            batcher.submit(Job(sample=r, adapter=None, max_tokens=1), lambda job, err: done.set())
            assert done.wait(10)
            assert time.monotonic() - t < 1.0  # not the 5 s regather window: one row waits, one row ran last
    finally:
        batcher.stop()
    assert [len(c) for c in engine.calls] == [1] * 5


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="regather_wait_ms"):
        Batcher(_Engine(), _Metrics(), regather_wait_ms=-1)
