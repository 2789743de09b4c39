"""Prometheus metrics of one server (its own registry, so several servers in one process stay apart),
plus the small JSON summary the playground polls."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("vltune_requests", "Chat completion requests by HTTP status.", ["status"],
                                registry=self.registry)
        self.latency = Histogram("vltune_request_latency_seconds", "Chat completion latency (streams: to the "
                                 "first byte).", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("vltune_queue_depth", "Requests waiting for a batch.", registry=self.registry)
        self.batch_size = Histogram("vltune_batch_size", "Requests (rows) per generate call.", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.tokens = Counter("vltune_generated_tokens", "Generated tokens.", registry=self.registry)
        self.tokens_per_second = Gauge("vltune_tokens_per_second", "Generated tokens per second of the last batch.",
                                       registry=self.registry)
        self.adapters_loaded = Gauge("vltune_adapters_loaded", "Adapters in memory.", registry=self.registry)
        self._lock = threading.Lock()
        self._by_status: Tally = Tally()
        self._recent: deque[float] = deque(maxlen=200)
        self._batches: Tally = Tally()

    def observe_request(self, status: int, seconds: float) -> None:
        self.requests.labels(status=str(status)).inc()
        self.latency.observe(seconds)
        with self._lock:
            self._by_status[status] += 1
            if status == 200:
                self._recent.append(seconds)

    def observe_batch(self, size: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.tokens.inc(tokens)
        self.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)
        with self._lock:
            self._batches[size] += 1

    def summary(self) -> dict:
        """Counts by status, latency of the last 200 answered requests (ms), batch-size histogram."""
        with self._lock:
            recent = sorted(self._recent)
            by_status = {str(k): v for k, v in sorted(self._by_status.items())}
            batches = {str(k): v for k, v in sorted(self._batches.items())}

        def pct(q):
            return round(1000 * recent[min(len(recent) - 1, int(q * len(recent)))], 1) if recent else None

        return {"requests": by_status, "total": sum(by_status.values()),
                "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "last": round(1000 * self._recent[-1], 1)
                               if self._recent else None},
                "batch_sizes": batches, "queue_depth": int(self.queue_depth._value.get())}
