"""The robot side of `vltune serve policy`: one action per control step, the next chunk fetched in the background.

    from vltune.vla.client import PolicyClient
    client = PolicyClient("http://127.0.0.1:8777")          # chunk_threshold=0.5, aggregate="weighted_average"
    client.reset()                                           # a new episode (and a server session) per episode
    while running:
        action = client.step({"static": rgb, "state": proprio, "instruction": "open the drawer"})

Chunking:
- `chunk_threshold=0` is synchronous: a chunk is fetched only when the queue is empty, and only its first
  `actions_per_chunk` actions (the policy's `exec_steps` by default) are executed; for a history window
  longer than one frame every other frame is still sent (`mode: observe`). Actions then equal the in-process
  `Policy.step` on the same frames.
- `0 < chunk_threshold <= 1` is asynchronous (LeRobot's scheme): once fewer than `chunk_threshold * chunk size`
  actions are queued, the current observation is sent in the background while the queue keeps being
  executed. Each chunk is aligned to the step its observation was taken at; where it overlaps actions still
  queued, the two are blended by `aggregate`: latest_only (new), weighted_average (0.3 old + 0.7 new),
  average (0.5 / 0.5), conservative (0.7 old + 0.3 new).
Network errors: the client keeps executing queued actions and retries; after `offline_tolerance_s` without
an answer (or when the queue runs dry and the server stays unreachable that long) it raises
`PolicyServerError`. A 4xx answer (a bad observation) raises `ObservationRejected` at once, naming the field.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np

from .wire import CAMERA_ALIASES, MSGPACK, image_bytes, json_dumps, json_loads, msgpack_dumps, msgpack_loads

logger = logging.getLogger("vltune")

AGGREGATIONS = {
    "latest_only": lambda old, new: new,
    "weighted_average": lambda old, new: 0.3 * old + 0.7 * new,
    "average": lambda old, new: 0.5 * old + 0.5 * new,
    "conservative": lambda old, new: 0.7 * old + 0.3 * new,
}


class PolicyServerError(RuntimeError):
    """The server could not be reached (for longer than the tolerance) or failed (5xx)."""


class ObservationRejected(ValueError):
    """The server answered 4xx: `field` names what was wrong with the request."""

    def __init__(self, status: int, detail: str, field: str | None):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.field = status, detail, field


class _NetworkError(Exception):
    pass


class PolicyClient:
    def __init__(self, url: str, *, chunk_threshold: float = 0.5, aggregate: str = "weighted_average",
                 actions_per_chunk: int | None = None, encoding: str = "msgpack", image_format: str = "raw",
                 api_key: str | None = None, session_id: str | None = None, timeout_s: float = 1.0,
                 offline_tolerance_s: float = 1.0, retry_interval_s: float = 0.05):
        import requests

        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate {aggregate!r}: choose one of {', '.join(AGGREGATIONS)}")
        if not 0.0 <= chunk_threshold <= 1.0:
            raise ValueError(f"chunk_threshold {chunk_threshold}: must be in [0, 1] (0 = synchronous)")
        if encoding not in ("msgpack", "json"):
            raise ValueError(f"encoding {encoding!r}: msgpack | json")
        if image_format not in ("raw", "png", "jpeg"):
            raise ValueError(f"image_format {image_format!r}: raw | png | jpeg")
        self.url = url.rstrip("/")
        self.chunk_threshold, self.aggregate_name = chunk_threshold, aggregate
        self.aggregate = AGGREGATIONS[aggregate]
        self.encoding, self.image_format = encoding, image_format
        self.timeout_s, self.offline_tolerance_s, self.retry_interval_s = timeout_s, offline_tolerance_s, retry_interval_s
        self.http = requests.Session()
        if api_key:
            self.http.headers["Authorization"] = f"Bearer {api_key}"
        self.session_id = session_id
        self._started = False
        self._info: dict | None = None
        self._actions_per_chunk = actions_per_chunk
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vltune-policy-client")
        self._inflight: Future | None = None
        self._episode = 0
        self._queue: deque = deque()  # [time step, action (A,)] in order, contiguous times
        self._t = 0  # the time step of the next action to execute
        self._offline_since: float | None = None
        self._last_error: str = ""
        self._warned_window = False
        self.stats = {"steps": 0, "chunks": 0, "background_chunks": 0, "network_errors": 0, "waits": 0,
                      "wait_s": 0.0}

    # ---------------------------------------------------------------- server info
    @property
    def info(self) -> dict:
        """GET /info: the policy's cameras, state length, chunk size, exec_steps, window size."""
        if self._info is None:
            try:
                r = self._request("GET", "/info")
            except _NetworkError as e:
                raise PolicyServerError(f"{self.url}: cannot reach the policy server ({e}); is "
                                        "`vltune serve policy` running there?") from e
            self._info = r.json()
        return self._info

    @property
    def actions_per_chunk(self) -> int:
        if self._actions_per_chunk is None:
            self._actions_per_chunk = max(1, min(int(self.info["exec_steps"]), int(self.info["chunk_size"])))
        return self._actions_per_chunk

    @property
    def synchronous(self) -> bool:
        return self.chunk_threshold == 0.0

    # ---------------------------------------------------------------- transport
    def _request(self, method: str, path: str, payload=None):
        import requests

        try:
            if payload is None:
                r = self.http.request(method, self.url + path, timeout=self.timeout_s)
            elif self.encoding == "msgpack":
                r = self.http.request(method, self.url + path, data=msgpack_dumps(payload),
                                      headers={"Content-Type": MSGPACK}, timeout=self.timeout_s)
            else:
                r = self.http.request(method, self.url + path, data=json_dumps(payload),
                                      headers={"Content-Type": "application/json"}, timeout=self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise _NetworkError(f"{type(e).__name__}: {e}") from e
        if 400 <= r.status_code < 500:
            try:
                body = r.json()
                detail, field = body.get("detail", r.text), body.get("field")
            except ValueError:
                detail, field = r.text, None
            raise ObservationRejected(r.status_code, str(detail), field)
        if r.status_code >= 500:
            raise PolicyServerError(f"{self.url}{path}: HTTP {r.status_code}: {r.text[:300]}")
        return r

    def _decode_actions(self, r) -> np.ndarray:
        if self.encoding == "msgpack":
            return np.asarray(msgpack_loads(r.content)["actions"], np.float32)
        return np.asarray(json_loads(r.content), np.float32)

    def _payload(self, obs: dict, mode: str) -> dict:
        out = dict(obs)
        if self.image_format != "raw":
            names = {n for c in self.info["cameras"] for n in CAMERA_ALIASES.get(c, (c,))}
            for k, v in obs.items():
                if k in names and isinstance(v, np.ndarray) and v.ndim == 3:
                    data = image_bytes(v, self.image_format)
                    out[k] = data if self.encoding == "msgpack" else __import__("base64").b64encode(data).decode()
        for k, v in out.items():
            if isinstance(v, (list, tuple)) and k in ("state", "proprio"):
                out[k] = np.asarray(v, np.float32)
        out["mode"] = mode
        if self.session_id is not None:
            out["session_id"] = self.session_id
        return out

    def act(self, obs: dict, mode: str = "chunk") -> np.ndarray:
        """One request: the server's chunk (N, A) for this observation (no queue, no retries)."""
        return self._decode_actions(self._request("POST", "/act", self._payload(obs, mode)))

    # ---------------------------------------------------------------- episodes
    def reset(self) -> str:
        """Start a new episode: the server session's window and the local queue are cleared."""
        if self._inflight is not None:
            self._inflight.cancel() or self._wait_quietly(self._inflight)
            self._inflight = None
        self._episode += 1
        self._queue.clear()
        self._t = 0
        payload = {} if self.session_id is None else {"session_id": self.session_id}
        try:
            r = self._request("POST", "/reset", payload)
        except _NetworkError as e:
            raise PolicyServerError(f"{self.url}: cannot reach the policy server to start an episode ({e})") from e
        body = msgpack_loads(r.content) if self.encoding == "msgpack" else r.json()
        self.session_id = body["session_id"]
        self._started = True
        return self.session_id

    def close(self) -> None:
        if self._inflight is not None:
            self._wait_quietly(self._inflight)
        self._pool.shutdown(wait=True)
        if self.session_id is not None:
            try:
                self.http.delete(f"{self.url}/sessions/{self.session_id}", timeout=self.timeout_s)
            except Exception:  # the server may be gone already; nothing to clean up then
                pass
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _wait_quietly(fut: Future) -> None:
        try:
            fut.result()
        except Exception:  # a stale episode's fetch: its outcome no longer matters
            pass

    # ---------------------------------------------------------------- the control step
    def _fetch(self, obs: dict, t: int, episode: int):
        return episode, t, self.act(obs)

    def _offline(self, error: str) -> None:
        self.stats["network_errors"] += 1
        self._last_error = error
        if self._offline_since is None:
            self._offline_since = time.monotonic()

    def _check_offline(self) -> None:
        if self._offline_since is not None and time.monotonic() - self._offline_since > self.offline_tolerance_s:
            raise PolicyServerError(f"{self.url}: no answer for {time.monotonic() - self._offline_since:.2f} s "
                                    f"(offline_tolerance_s {self.offline_tolerance_s}); last error: {self._last_error}")

    def _merge(self, chunk: np.ndarray, t0: int, keep: int | None = None) -> None:
        """Queue chunk[i] as the action of step t0 + i (blending where actions for that step are queued)."""
        if keep is not None:
            chunk = chunk[:keep]
        start = self._queue[0][0] if self._queue else self._t
        for i, a in enumerate(chunk):
            t = t0 + i
            if t < self._t:
                continue  # that step has been executed already
            k = t - start
            if 0 <= k < len(self._queue):
                self._queue[k][1] = self.aggregate(self._queue[k][1], a)
            elif k == len(self._queue):
                self._queue.append([t, a])

    def _harvest(self, block: bool = False) -> None:
        fut = self._inflight
        if fut is None or not (block or fut.done()):
            return
        self._inflight = None
        try:
            episode, t0, chunk = fut.result(timeout=None if block else 0)
        except _NetworkError as e:
            self._offline(str(e))
            return
        self._offline_since = None
        if episode == self._episode:
            self.stats["background_chunks"] += 1
            self._merge(chunk, t0)

    def _fetch_now(self, obs: dict) -> None:
        """Block until a chunk for the current step is queued (retrying within the tolerance)."""
        t0 = time.perf_counter()
        self.stats["waits"] += 1
        while True:
            if self._inflight is not None:
                self._harvest(block=True)
                if self._queue:
                    break
            try:
                chunk = self.act(obs)
            except _NetworkError as e:
                self._offline(str(e))
                self._check_offline()
                time.sleep(self.retry_interval_s)
                continue
            self._offline_since = None
            self._merge(chunk, self._t, self.actions_per_chunk if self.synchronous else None)
            break
        self.stats["chunks"] += 1
        self.stats["wait_s"] += time.perf_counter() - t0

    def step(self, obs: dict) -> np.ndarray:
        """The next action (A,) for this observation: `{camera: uint8 (H, W, 3), "state": ..., "instruction": ...}`."""
        if not self._started:
            self.reset()
        self._harvest()
        self._check_offline()
        while self._queue and self._queue[0][0] < self._t:
            self._queue.popleft()
        window = int(self.info["window_size"])
        if self._queue and window > 1:
            if self.synchronous:
                self._observe_with_retries(obs)  # the server's window must hold every frame, as in-process
            elif not self._warned_window:
                self._warned_window = True
                logger.warning("[client] the policy's window holds %d frames but asynchronous chunking sends only "
                               "the frames chunks are asked for; use chunk_threshold 0 for the trained spacing",
                               window)
        if not self._queue:
            self._fetch_now(obs)
        _, action = self._queue.popleft()
        self._t += 1
        self.stats["steps"] += 1
        if (not self.synchronous and self._inflight is None
                and len(self._queue) < self.chunk_threshold * int(self.info["chunk_size"])):
            self._inflight = self._pool.submit(self._fetch, dict(obs), self._t - 1, self._episode)
        return np.asarray(action, np.float32)

    def _observe_with_retries(self, obs: dict) -> None:
        while True:
            try:
                self.act(obs, mode="observe")
                self._offline_since = None
                return
            except _NetworkError as e:
                self._offline(str(e))
                self._check_offline()
                time.sleep(self.retry_interval_s)


class RemotePolicy:
    """`Policy`'s closed-loop interface (`reset`, `step(images, instruction, state)`, `config`) over a server."""

    def __init__(self, client: PolicyClient):
        self.client = client
        info = client.info
        self.config = SimpleNamespace(cameras=list(info["cameras"]), use_images=bool(info["use_images"]),
                                      image_size=int(info["image_size"]), action_dim=int(info["action_dim"]),
                                      window_size=int(info["window_size"]),
                                      exec_steps=int(info["exec_steps"]), chunk_size=int(info["chunk_size"]),
                                      state_dim=int(info["state_length"]),
                                      state_indices=list(range(int(info["state_length"]))))

    def reset(self) -> None:
        self.client.reset()

    def step(self, images, instruction: str, state=None) -> np.ndarray:
        obs = dict(images) if self.config.use_images else {}
        obs["instruction"] = instruction
        if state is not None:
            obs["state"] = np.asarray(state, np.float32)
        return self.client.step(obs)
