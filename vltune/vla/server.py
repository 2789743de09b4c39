"""Serve a VLA policy to robots over the network: OpenVLA-OFT's `POST /act`, robot sessions, batched backbone calls.

    from vltune.vla.policy import Policy
    from vltune.vla.server import ServerSettings, create_app
    app = create_app(Policy.from_pretrained("out/mw"), ServerSettings(api_key="secret"))   # uvicorn.run(app, ...)

Routes (bodies are JSON with json-numpy arrays, or msgpack with `Content-Type: application/msgpack`):
- `POST /act`: an observation dict `{<camera>: image, "state": (S,), "instruction": str}` (+ optional
  `session_id`, `mode`) -> the un-normalised action chunk, float32 (N, action_dim). JSON requests get the
  bare json-numpy array, as OpenVLA-OFT's server returns it (`{"encoded": ...}` requests get it
  double-encoded); msgpack requests get `{"actions", "session_id", "server_ms", "model_ms", "batch"}`
  (`server_ms`: the request inside the server; `model_ms`: its batch's policy call, so the network path's own
  cost is the client's round trip minus `model_ms`; headers `X-Server-Ms`, `X-Model-Ms`, `X-Batch-Size`).
  `mode`: `chunk` (default: add the frame to the window, predict a chunk), `observe` (add the frame only;
  returns (0, A)), `step` (exactly `Policy.step` on the server: one action (1, A), the chunk kept there).
  Without `session_id` the request is stateless (a window of this frame alone, as OFT's server is).
- `POST /reset` `{"session_id": optional}`: starts (or restarts) a robot's episode; returns its id.
  A session keeps that robot's history window and pending chunk; sessions never share frames.
- `DELETE /sessions/{id}`, `GET /info` (what an observation must hold), `GET /health`, `GET /stats`.
- `WS /ws`: one session per connection; each binary (msgpack) or text (JSON) message is an observation
  (or `{"reset": true}`), each reply the same dict as a msgpack `/act` reply.

Requests that arrive while the backbone is busy wait in one queue; the next forward takes the frames of up to
`max_batch` different sessions at once (one backbone call, left-padded prompts), then each session's head.
Every malformed request gets a 4xx `{"detail", "field"}` before it reaches the queue, so it cannot disturb
other sessions.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import queue
import re
import socket
import threading
import time
import traceback
import uuid
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers, QueryParams

from .wire import BadRequest, Observation, ObservationSpec, decode_body, encode_body, parse_observation

logger = logging.getLogger("vltune")
SESSION_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


@dataclass
class ServerSettings:
    api_key: str | None = None  # clients send `Authorization: Bearer KEY` (or `X-API-Key: KEY`)
    max_batch: int = 8  # frames of different sessions per backbone forward
    batch_wait_ms: float = 0.0  # extra wait for more requests before a forward (0: take what is queued)
    max_sessions: int = 64
    session_ttl_s: float = 600.0  # idle sessions are dropped after this long
    max_body_bytes: int = 16 * 1024 * 1024


# ---------------------------------------------------------------------------- sessions
class Session:
    """One robot: a `Policy` sharing the served model, with its own window and pending chunk."""

    def __init__(self, sid: str, policy):
        self.id, self.policy, self.last_used, self.steps = sid, policy, time.monotonic(), 0


class SessionStore:
    def __init__(self, template, settings: ServerSettings):
        self.template, self.settings = template, settings
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()

    def fresh_policy(self):
        """A new, empty window over the served model (cheap: no weights are copied)."""
        from .policy import Policy

        t = self.template
        return Policy(t.model, t.frames, t.normalizers, t.device)

    def reset(self, sid: str | None) -> Session:
        if sid is not None and not (isinstance(sid, str) and SESSION_ID.match(sid)):
            raise BadRequest("session_id", "1-128 characters of letters, digits, _ . : -", 422)
        with self.lock:
            self._expire()
            if sid in self.sessions:
                s = self.sessions[sid]
                s.policy.reset()
                s.steps, s.last_used = 0, time.monotonic()
                return s
            if len(self.sessions) >= self.settings.max_sessions:
                raise BadRequest("session_id", f"{len(self.sessions)} sessions are open (max_sessions); end finished "
                                 "ones with DELETE /sessions/{id} or start the server with a larger --max_sessions", 429)
            s = Session(sid or uuid.uuid4().hex, self.fresh_policy())
            self.sessions[s.id] = s
            return s

    def get(self, sid: str) -> Session:
        with self.lock:
            s = self.sessions.get(sid)
            if s is None:
                raise BadRequest("session_id", f"unknown session {sid!r} (never started, ended, or idle longer than "
                                 f"{self.settings.session_ttl_s:.0f} s): POST /reset first", 404)
            s.last_used = time.monotonic()
            return s

    def delete(self, sid: str) -> bool:
        with self.lock:
            return self.sessions.pop(sid, None) is not None

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [k for k, s in self.sessions.items() if now - s.last_used > self.settings.session_ttl_s]:
            del self.sessions[sid]


# ---------------------------------------------------------------------------- batching
@dataclass
class Job:
    policy: object  # the session's Policy (or a stateless one)
    obs: Observation
    key: str  # session id (or a unique key for stateless requests): at most one job per key in a batch
    future: Future = field(default_factory=Future)

    def needs_frame(self) -> bool:
        p = self.policy
        return not (self.obs.mode == "step" and p._plan and p.config.window_size == 1)


def run_batch(jobs: list[Job]) -> list[np.ndarray]:
    """One backbone forward over the new frames of all jobs, then each job's head (returns float32 (n, A))."""
    framed = [j for j in jobs if j.needs_frame()]
    if framed:
        p0 = framed[0].policy
        images = [j.policy._frame_images(j.obs.images) for j in framed]  # each (1, C, S, S, 3) or None
        kw = p0.frames([j.obs.instruction for j in framed], None if images[0] is None else torch.cat(images))
        feats = p0.model.encode(**{k: v.to(p0.device) for k, v in kw.items()})  # (M, D)
        for j, f in zip(framed, feats):
            j.policy._feats.append(f)
            j.policy._states.append(j.policy._state(j.obs.state))
    out = []
    for j in jobs:
        p = j.policy
        if j.obs.mode == "observe":
            out.append(np.zeros((0, p.config.action_dim), np.float32))
        elif j.obs.mode == "chunk":
            out.append(p.predict_chunk().astype(np.float32))
        else:  # step: Policy.step's re-planning rule, on the server
            if not p._plan:
                chunk = p.predict_chunk()
                p._plan = list(chunk[: max(1, min(p.config.exec_steps, len(chunk)))])
            out.append(np.asarray(p._plan.pop(0), np.float32)[None])
    return out


class Batcher:
    """A worker thread owning the model: takes queued jobs, runs them in batches, completes their futures."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.queue: queue.Queue = queue.Queue()
        self.carry: list[Job] = []  # jobs of a session already in the running batch wait for the next one
        self.batches = self.frames = 0
        self.batch_sizes: dict[int, int] = {}
        self.thread = threading.Thread(target=self._loop, name="vltune-policy-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> Future:
        self.queue.put(job)
        return job.future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _collect(self) -> list[Job] | None:
        pending = self.carry
        self.carry = []
        if not pending:
            job = self.queue.get()
            if job is None:
                return None
            pending = [job]
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while True:  # drain what is queued (and what arrives within batch_wait_ms)
            wait = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)
                break
            pending.append(job)
        batch, seen = [], set()
        for job in pending:
            if job.key in seen or len(batch) >= self.settings.max_batch:
                self.carry.append(job)  # keeps each session's order
            else:
                seen.add(job.key)
                batch.append(job)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            n = sum(j.needs_frame() for j in batch)  # frames that go through the backbone
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    results = run_batch(batch)
            except Exception as e:  # our bug, not the client's: every job of the batch gets a 500
                logger.error("[serve] batch of %d failed:\n%s", len(batch), traceback.format_exc())
                for job in batch:
                    job.future.set_exception(e)
                continue
            self.batches += 1
            self.frames += n
            self.batch_sizes[n] = self.batch_sizes.get(n, 0) + 1
            model_ms = round((time.perf_counter() - t0) * 1000, 3)  # the batch's policy time, shared by its jobs
            for job, r in zip(batch, results):
                job.future.set_result((r, len(batch), model_ms))


# ---------------------------------------------------------------------------- the app
async def _read_body(request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BadRequest("body", f"{int(length)} bytes is over the {limit}-byte limit (--max_body_mb); send smaller "
                         "or PNG/JPEG-encoded images", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest("body", f"over the {limit}-byte limit (--max_body_mb)", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _authorised(headers, query, key: str | None) -> bool:
    if not key:
        return True
    auth = headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key") or query.get("api_key") or ""
    return hmac.compare_digest(given.encode(), key.encode())


class _CountAndAuthorise:
    """Counts HTTP requests and refuses a missing or wrong key (401), /health excepted.

    A plain ASGI middleware rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs the
    endpoint in a task and pipes its response through a memory stream, which costs about a millisecond a
    request, a third of the 3 ms a control step may spend on the network path."""

    def __init__(self, app, key: str | None, counters: dict):
        self.app, self.key, self.counters = app, key, counters

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # the websocket checks its key itself
            return await self.app(scope, receive, send)
        self.counters["requests"] += 1
        if self.key and scope["path"] != "/health":
            if not _authorised(Headers(scope=scope), QueryParams(scope.get("query_string", b"")), self.key):
                self.counters["errors_4xx"] += 1
                response = JSONResponse({"detail": "api_key: missing or wrong; send `Authorization: Bearer <key>`",
                                         "field": "api_key"}, status_code=401)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(policy, settings: ServerSettings | None = None):
    """A FastAPI app serving `policy` (a loaded `vltune.vla.policy.Policy`); the batcher starts with it."""
    settings = settings or ServerSettings()
    spec = ObservationSpec.of(policy.config)
    store = SessionStore(policy, settings)
    batcher = Batcher(settings)
    counters = {"requests": 0, "errors_4xx": 0, "errors_5xx": 0}
    cfg = policy.config
    info = {**spec.info(), "action_dim": cfg.action_dim, "chunk_size": cfg.fwd_pred_next_n,
            "exec_steps": cfg.exec_steps, "window_size": cfg.window_size, "image_size": cfg.image_size,
            "gripper_dims": cfg.gripper_dims, "backbone": cfg.backbone, "encodings": ["json-numpy", "msgpack"],
            "modes": ["chunk", "step", "observe"], "max_body_bytes": settings.max_body_bytes}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.close()

    app = FastAPI(title="vltune policy server", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher, app.state.sessions, app.state.policy = batcher, store, policy

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        counters["errors_4xx"] += 1
        return JSONResponse(exc.payload(), status_code=exc.status)

    app.add_middleware(_CountAndAuthorise, key=settings.api_key, counters=counters)

    async def act_on(payload_obs: Observation, session: Session | None) -> tuple[np.ndarray, int, str | None, float]:
        job = Job(session.policy if session else store.fresh_policy(), payload_obs,
                  session.id if session else uuid.uuid4().hex)
        try:
            chunk, batch, model_ms = await asyncio.wrap_future(batcher.submit(job))
        except Exception as e:
            counters["errors_5xx"] += 1
            raise RuntimeError(f"policy failed: {e}") from e
        if session:
            session.steps += 1
        return chunk, batch, session.id if session else None, model_ms

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def get_info():
        return info

    @app.get("/stats")
    async def stats():
        return {**counters, "sessions": len(store.sessions), "batches": batcher.batches, "frames": batcher.frames,
                "batch_sizes": {str(k): v for k, v in sorted(batcher.batch_sizes.items())}}

    @app.post("/reset")
    async def reset(request: Request):
        dec = decode_body(await _read_body(request, settings.max_body_bytes), request.headers.get("content-type"))
        s = store.reset(dec.payload.get("session_id"))
        body, ctype = encode_body({"session_id": s.id}, dec.encoding)
        return Response(body, media_type=ctype)

    @app.delete("/sessions/{sid}")
    async def end_session(sid: str):
        if not store.delete(sid):
            raise BadRequest("session_id", f"unknown session {sid!r}", 404)
        return {"session_id": sid, "ended": True}

    @app.post("/act")
    async def act(request: Request):
        t0 = time.perf_counter()
        dec = decode_body(await _read_body(request, settings.max_body_bytes), request.headers.get("content-type"))
        obs = parse_observation(dec.payload, spec)
        session = store.get(obs.session_id) if obs.session_id is not None else None
        chunk, batch, sid, model_ms = await act_on(obs, session)
        ms = round((time.perf_counter() - t0) * 1000, 3)
        headers = {"X-Server-Ms": str(ms), "X-Model-Ms": str(model_ms), "X-Batch-Size": str(batch)}
        if sid:
            headers["X-Session-Id"] = sid
        if dec.encoding == "msgpack":
            body, ctype = encode_body({"actions": chunk, "session_id": sid, "server_ms": ms, "model_ms": model_ms,
                                       "batch": batch}, "msgpack")
        else:
            body, ctype = encode_body(chunk, "json", dec.double_encoded)
        return Response(body, media_type=ctype, headers=headers)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        if not _authorised(websocket.headers, websocket.query_params, settings.api_key):
            await websocket.close(code=1008, reason="api_key: missing or wrong")
            return
        await websocket.accept()
        session = None
        try:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                t0 = time.perf_counter()
                data, is_text = (msg.get("bytes"), False) if msg.get("bytes") is not None else (msg.get("text"), True)
                try:
                    if len(data or b"") > settings.max_body_bytes:
                        raise BadRequest("body", f"message over the {settings.max_body_bytes}-byte limit", 413)
                    dec = decode_body(data.encode() if is_text else data, None if is_text else "application/msgpack")
                    reset = dec.payload.get("reset") is True
                    if session is None or reset:
                        if session is not None:
                            store.delete(session.id)
                        session = store.reset(dec.payload.get("session_id"))
                        if reset:
                            body, _ = encode_body({"session_id": session.id, "reset": True},
                                                  "json" if is_text else "msgpack")
                            await (websocket.send_text(body.decode()) if is_text else websocket.send_bytes(body))
                            continue
                    obs = parse_observation({**dec.payload, "session_id": session.id}, spec)
                    chunk, batch, sid, model_ms = await act_on(obs, store.get(session.id))
                    reply = {"actions": chunk, "session_id": sid, "batch": batch, "model_ms": model_ms,
                             "server_ms": round((time.perf_counter() - t0) * 1000, 3)}
                except BadRequest as e:
                    counters["errors_4xx"] += 1
                    reply = {**e.payload(), "status": e.status}
                body, _ = encode_body(reply, "json" if is_text else "msgpack")
                await (websocket.send_text(body.decode()) if is_text else websocket.send_bytes(body))
        except WebSocketDisconnect:
            pass
        finally:
            if session is not None:
                store.delete(session.id)

    return app


# ---------------------------------------------------------------------------- running it
def bound_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


@contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, access_log: bool = False):
    """Serve `app` from a background thread (port 0 = a free one); yields the base URL, e.g. http://127.0.0.1:PORT."""
    import uvicorn

    sock = bound_socket(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=access_log, ws_max_size=16 * 1024 * 1024)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the policy server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
