"""The FastAPI application: OpenAI-compatible routes, health, Prometheus metrics and the playground page.

    POST /v1/chat/completions   text + image_url parts; stream: true answers as server-sent events
    GET  /v1/models             the global model and every adapter the caller's key reaches
    GET  /health                liveness + what is loaded
    GET  /metrics               Prometheus text format
    GET  /stats                 a JSON summary for the playground
    GET  /                      the playground (static/playground.html)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import AdapterPool, adapter_paths, parse_named_adapters
from .auth import KeyRing, load_key_file
from .batcher import Batcher, QueueFull
from .engine import Engine, Job
from .metrics import Metrics
from .options import ServeArguments
from .protocol import APIError, generation_limits, image_urls, load_checked_image, parse_request, to_sample

logger = logging.getLogger("vltune")

PLAYGROUND = Path(__file__).parent / "static" / "playground.html"


class Service:
    """Everything one server holds: the adapter pool on the loaded model, the engine, queue, keys, metrics."""

    def __init__(self, pool: AdapterPool, processor, convention: str, opts: ServeArguments, keys: KeyRing,
                 base_name: str):
        self.pool, self.opts, self.keys, self.base_name = pool, opts, keys, base_name
        self.metrics = Metrics()
        self.engine = Engine(pool, processor, convention)
        self.batcher = Batcher(self.engine, self.metrics, opts.max_batch_size, opts.max_batch_wait_ms,
                               opts.max_queue_size, opts.regather_wait_ms)
        self.created = int(time.time())


def load_service(model_args, opts: ServeArguments) -> Service:
    """Load the global model once (a LoRA --model is merged into its base, as `vltune infer
    --per_user_adapters` does) and set up the adapters, keys and queue; raises ValueError on bad options."""
    from ..models.adapters import load_global
    from ..models.load import model_family, resolve_model_path

    paths = adapter_paths(opts.per_user_adapters, parse_named_adapters(opts.adapters))  # before the model loads
    keys = KeyRing(opts.api_key, load_key_file(opts.api_keys) if opts.api_keys else None)
    path = model_args.model or resolve_model_path(model_args)
    family = model_family(path, model_args.trust_remote_code)
    model, processor, described = load_global(replace(model_args, model=path), path)
    pool = AdapterPool(model, paths, opts.max_loaded_adapters)
    base_name = opts.served_model_name or (os.path.basename(os.path.normpath(model_args.model)) if model_args.model
                                           else f"tiny-{model_args.model_family}")
    logger.info("[serve] %s as %r (%s clicks), %d adapter(s)", described, base_name, family.coords, len(pool.paths))
    return Service(pool, processor, family.coords, opts, keys, base_name)


def _error(e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_body(request, limit: int) -> bytes:
    too_big = APIError(413, f"body: the request is over the server's limit of {limit} bytes "
                            f"(--max_request_bytes); send a smaller screenshot", param="body")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: Service):
    opts, pool, keys, metrics = service.opts, service.pool, service.keys, service.metrics

    @asynccontextmanager
    async def lifespan(_app):
        service.batcher.start()
        yield
        service.batcher.stop()

    app = FastAPI(title="vltune serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc):
        return _error(APIError(exc.status_code, f"{exc.detail}"))

    def reach_of(request: Request):
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else None
        reach = keys.lookup(given)
        if reach is None:
            raise APIError(401, "Authorization: missing or unknown API key; send 'Authorization: Bearer KEY'",
                           param="Authorization", code="invalid_api_key")
        return reach

    async def prepare(request: Request):
        """Everything up to the queue: auth, body, validation, adapter, limits, images -> (req, job, adapter)."""
        reach = reach_of(request)
        body = await _read_body(request, opts.max_request_bytes)
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"body: not valid JSON ({e}); send a JSON object", param="body") from None
        if not isinstance(payload, dict):
            raise APIError(400, "body: expected a JSON object with 'messages'", param="body")
        req = parse_request(payload)
        adapter, identity = pool.resolve(req.model, req.user, service.base_name)
        if not keys.allows(reach, identity):
            raise APIError(403, f"model: this API key may not use {identity!r}; use a key issued for that user",
                           param="model", code="permission_denied")
        max_tokens = generation_limits(req, opts)
        urls = image_urls(req)
        if len(urls) > opts.max_images_per_request:
            raise APIError(400, f"messages: {len(urls)} images in one request, over the server's limit of "
                                f"{opts.max_images_per_request} (--max_images_per_request)", param="messages")
        images = await run_in_threadpool(lambda: [load_checked_image(u, p, opts) for u, p in urls])
        job = Job(sample=to_sample(req, images), adapter=adapter, max_tokens=max_tokens, stops=req.stops,
                  temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        return req, job, (images[0] if images else None)

    def submit(job: Job, notify) -> None:
        try:
            service.batcher.submit(job, notify)
        except QueueFull as e:
            raise APIError(429, "the server's queue is full; retry after the Retry-After seconds",
                           code="rate_limited", headers={"Retry-After": str(int(e.retry_after + 0.999))}) from None

    def timeout_error() -> APIError:
        return APIError(504, f"the request was not answered within {opts.request_timeout} s (--request_timeout); "
                             f"retry, or ask for fewer max_tokens", code="timeout")

    def extras(req, job: Job, image) -> dict:
        out = {"adapter": job.adapter}
        if req.return_click:
            out["click"] = service.engine.click(job.text, image)
        return out

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        start = time.monotonic()
        status = 200
        try:
            req, job, image = await prepare(request)
            loop = asyncio.get_running_loop()
            if req.stream:
                return await stream(req, job, image, loop, start)
            future = loop.create_future()

            def done(_job, error):
                loop.call_soon_threadsafe(lambda: future.done() or future.set_result(error))

            submit(job, done)
            try:
                error = await asyncio.wait_for(asyncio.shield(future), opts.request_timeout - (time.monotonic() - start))
            except asyncio.TimeoutError:
                service.batcher.cancel(job)
                raise timeout_error() from None
            if error is not None:
                raise APIError(500, f"generation failed: {type(error).__name__}: {error}")
            return JSONResponse({
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": job.adapter or service.base_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                             "finish_reason": job.finish_reason}],
                "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": len(job.tokens),
                          "total_tokens": job.prompt_tokens + len(job.tokens)},
                **extras(req, job, image)})
        except APIError as e:
            status = e.status
            return _error(e)
        finally:
            metrics.observe_request(status, time.monotonic() - start)

    async def stream(req, job: Job, image, loop, start):
        events: asyncio.Queue = asyncio.Queue()
        job.on_delta = lambda text: loop.call_soon_threadsafe(events.put_nowait, ("delta", text))
        submit(job, lambda _job, error: loop.call_soon_threadsafe(events.put_nowait, ("done", error)))
        try:
            first = await asyncio.wait_for(events.get(), opts.request_timeout - (time.monotonic() - start))
        except asyncio.TimeoutError:
            service.batcher.cancel(job)
            raise timeout_error() from None
        ident, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), job.adapter or service.base_name

        def chunk(delta: dict, finish=None, **more) -> str:
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more}
            return f"data: {json.dumps(body)}\n\n"

        async def events_out():
            yield chunk({"role": "assistant", "content": ""})
            kind, value = first
            while kind == "delta":
                yield chunk({"content": value})
                kind, value = await events.get()
            if value is not None:
                yield f"data: {json.dumps(APIError(500, f'generation failed: {value}').body())}\n\n"
            else:
                yield chunk({}, job.finish_reason, **extras(req, job, image),
                            usage={"prompt_tokens": job.prompt_tokens, "completion_tokens": len(job.tokens),
                                   "total_tokens": job.prompt_tokens + len(job.tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events_out(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            reach = reach_of(request)
        except APIError as e:
            return _error(e)
        entry = {"object": "model", "created": service.created, "owned_by": "vltune"}
        data = [{"id": service.base_name, **entry}]
        data += [{"id": n, **entry, "parent": service.base_name} for n in pool.names if keys.allows(reach, n)]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.base_name, "adapters": len(pool.paths),
                "loaded_adapters": list(pool.loaded), "queue_depth": len(service.batcher.pending),
                "auth": keys.enabled}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats():
        return metrics.summary()

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    return app
