"""The bounded queue that gathers concurrent requests into engine batches, run on one worker thread.

The first waiting request waits at most --max_batch_wait_ms for others; the batch then takes up to
--max_batch_size waiting requests with the same decoding settings (any adapters). While a batch runs,
new requests queue up and form the next one. A full queue refuses new requests (QueueFull -> 429);
a request whose caller gave up (504) is dropped before it reaches the model.

Regathering (--regather_wait_ms): when a batch has just been answered and fewer requests wait than it had,
its callers are most likely about to send their next ones (an app's users, an agent loop). Without waiting
for them, N concurrent clients split into two cohorts that alternate on the model (measured: 16 clients ran
as batches of 5 and 11), each call paying the whole decode for a part of the rows. So the next batch waits up
to --regather_wait_ms after the last one was answered, until its rows plus those that were already waiting
then are waiting again: the cohorts merge into one call. A lone client never waits (one row expected, one
waiting), nor does the first request after the server was idle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from .engine import Job

logger = logging.getLogger("vltune")


class QueueFull(Exception):
    def __init__(self, retry_after: float):
        super().__init__("queue full")
        self.retry_after = retry_after


class Batcher:
    def __init__(self, engine, metrics, max_batch_size: int = 16, max_batch_wait_ms: float = 5.0,
                 max_queue_size: int = 256, regather_wait_ms: float = 0.0):
        if max_batch_size < 1 or max_queue_size < 1 or max_batch_wait_ms < 0 or regather_wait_ms < 0:
            raise ValueError("--max_batch_size and --max_queue_size must be >= 1, --max_batch_wait_ms and "
                             "--regather_wait_ms >= 0")
        self.engine, self.metrics = engine, metrics
        self.max_batch_size, self.wait = max_batch_size, max_batch_wait_ms / 1000
        self.regather = regather_wait_ms / 1000
        self.expected, self.last_end = 0, 0.0  # rows expected back after the previous batch; when it was answered
        self.max_queue_size = max_queue_size
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.batch_seconds = 0.0  # moving average, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="vltune-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def submit(self, job: Job, done) -> None:
        """Queue `job`; `done(job, error)` is called from the worker thread when it is answered."""
        with self.cond:
            if len(self.pending) >= self.max_queue_size:
                batches_ahead = len(self.pending) / self.max_batch_size + 1
                raise QueueFull(retry_after=max(1.0, batches_ahead * self.batch_seconds))
            job.done = done
            self.pending.append(job)
            self.metrics.queue_depth.set(len(self.pending))
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The caller gave up (504): drop the job if it is still waiting."""
        with self.cond:
            job.cancelled = True
            if job in self.pending:
                self.pending.remove(job)
                self.metrics.queue_depth.set(len(self.pending))
            self.cond.notify_all()

    def _take(self) -> list[Job] | None:
        with self.cond:
            while True:
                while self.pending and self.pending[0].cancelled:
                    self.pending.popleft()
                if self.stopping:
                    return None
                if not self.pending:
                    self.cond.wait()
                    continue
                first = self.pending[0]
                same = [j for j in self.pending if j.batch_key == first.batch_key and not j.cancelled]
                now = time.monotonic()
                left = first.enqueued + self.wait - now
                if len(same) < min(self.expected, self.max_batch_size):  # the last batch's callers may be coming
                    left = max(left, self.last_end + self.regather - now)
                if len(same) >= self.max_batch_size or left <= 0:
                    batch = same[:self.max_batch_size]
                    taken = set(map(id, batch))
                    self.pending = deque(j for j in self.pending if id(j) not in taken and not j.cancelled)
                    self.metrics.queue_depth.set(len(self.pending))
                    return batch
                self.cond.wait(timeout=left)

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            start = time.monotonic()
            error, calls = None, []
            try:
                calls = self.engine.run(batch)
            except Exception as e:  # noqa: BLE001 -- answered as a 500 for this batch; the server goes on
                logger.exception("[serve] a batch of %d failed", len(batch))
                error = e
            seconds = time.monotonic() - start
            self.batch_seconds = seconds if not self.batch_seconds else 0.8 * self.batch_seconds + 0.2 * seconds
            for rows, tokens, call_seconds in calls:
                self.metrics.observe_batch(rows, tokens, call_seconds)
            self.metrics.adapters_loaded.set(len(self.engine.pool.loaded))
            for job in batch:
                job.done(job, error)
            with self.cond:
                self.expected = len(batch) + sum(not j.cancelled for j in self.pending)
                self.last_end = time.monotonic()
