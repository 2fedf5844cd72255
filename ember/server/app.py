"""The ASGI application: OpenAI-compatible routes over one engine (FastAPI/Starlette).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (decoder folders with a
chat template), ``POST /v1/images/generations`` (diffusion folders), ``GET /v1/models``,
``GET /health`` (200 only once the engine is loaded; 503 while loading, draining or
failed), ``GET /metrics`` (Prometheus text). With an API key, ``/v1/*`` and ``/metrics``
need ``Authorization: Bearer <key>`` (compared in constant time); ``/health`` stays open
for load-balancer probes. Every error is an OpenAI-style ``{"error": {...}}`` body; an
unexpected exception is logged and answered 500 like any other error, so no request can
reset its keep-alive connection. A request body must arrive within ``body_timeout_s``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ember.errors import InputError
from ember.server import openai_schema as oa
from ember.server.completions import CLIENT_CLOSED, DecoderService
from ember.server.lifecycle import READY, EngineHolder
from ember.server.limits import ServerLimits
from ember.server.metrics import ServerMetrics

log = logging.getLogger("ember.server")

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/images/generations", "/v1/models", "/health", "/metrics")
METRICS_SAMPLE_S = 1.0
DRAIN_BODY_FACTOR = 8  # an oversized body up to this many times the limit is read and dropped, so the
# client sees the 413 instead of a reset connection; beyond that the connection is closed


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON: it encodes whatever text the message quotes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


class ContainErrors:
    """ASGI middleware: an exception a handler did not expect becomes a logged JSON 500.

    Starlette's own last-resort handler answers 500 and then re-raises, and uvicorn closes
    the connection on any exception that reaches it: the client's next request on that
    keep-alive connection would fail. Here the exception stops, once answered."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:  # noqa: BLE001 - the last line of defence: log it, answer it
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # a response cut short cannot be completed well-formed; uvicorn closes the connection
                raise
            body = oa.error_body(f"internal server error: {type(e).__name__}: {e}", "server_error")
            await ErrorResponse(body, status_code=500)(scope, receive, send)


class CountResponses:
    """ASGI middleware: counts responses by endpoint and status into ``ServerMetrics``."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        started = False

        async def counting_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.count_response(endpoint, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                self.metrics.count_response(endpoint, 500)
            raise


async def read_json(request: Request, limits: ServerLimits) -> Any:
    """The decoded JSON body; 413 past ``limits.max_body_bytes``, 408 if it has not all arrived
    within ``limits.body_timeout_s``, 400 if it is not JSON."""
    max_bytes = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise oa.ApiError(400, f"invalid Content-Length header {declared!r}")
    message = f"request body exceeds this server's limit of {max_bytes} bytes (--max-body-bytes)"
    too_big = oa.ApiError(413, message, code="body_too_large")
    too_big_to_drain = oa.ApiError(413, message, code="body_too_large", headers={"Connection": "close"})
    if declared is not None and int(declared) > max_bytes * DRAIN_BODY_FACTOR:
        raise too_big_to_drain
    body, size = bytearray(), 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes * DRAIN_BODY_FACTOR:
                    raise too_big_to_drain
                if size <= max_bytes:
                    body += chunk
    except ClientDisconnect:  # gone before the body arrived: nothing to run, nobody to answer
        raise oa.ApiError(CLIENT_CLOSED, "the client disconnected while sending the request body") from None
    except TimeoutError:  # the rest of the body may never come: answer and close the connection
        raise oa.ApiError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s "
                               "(--body-timeout); send the whole body without pausing", code="body_timeout",
                          headers={"Connection": "close"}) from None
    if size > max_bytes:
        raise too_big
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise oa.ApiError(400, f"request body is not valid JSON: {e}") from None


def api_key_check(api_key: str | None) -> Callable:
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise oa.ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                              type="authentication_error", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})
    return check


def create_app(factory: Callable[[], Any], *, model_name: str, folder: str | Path | None = None,
               api_key: str | None = None, limits: ServerLimits = ServerLimits(),
               on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The server app. ``factory()`` builds the engine (e.g. ``lambda: ember.load(folder)``);
    it runs on a background thread at startup. ``app.state.holder`` is the ``EngineHolder``,
    ``app.state.metrics`` the ``ServerMetrics``, ``app.state.begin_drain()`` starts a graceful
    drain (the CLI calls it on SIGTERM)."""
    metrics = ServerMetrics()
    holder = EngineHolder(factory, on_failure=on_load_failure)
    services: dict[str, Any] = {}

    loop_box: list[asyncio.AbstractEventLoop] = []

    def cancel_inflight() -> None:
        n = sum(service.cancel_inflight() for service in services.values())
        if n:
            log.warning("drain deadline (%.1f s) passed: cancelled %d in-flight request(s)", limits.drain_timeout_s, n)

    def begin_drain() -> None:
        """Stop taking requests; cancel those still running ``limits.drain_timeout_s`` later.
        Safe to call from a signal handler or another thread."""
        holder.begin_drain()
        if loop_box:
            loop = loop_box[0]
            loop.call_soon_threadsafe(lambda: loop.call_later(limits.drain_timeout_s, cancel_inflight))

    async def sample_engine_counters() -> None:
        """Feed the tokens/s and finishes/s windows (Retry-After uses them) without a scraper."""
        while True:
            await asyncio.sleep(METRICS_SAMPLE_S)
            if holder.state == READY and hasattr(holder.engine, "stats"):
                metrics.sample(holder.engine.stats())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop_box.append(asyncio.get_running_loop())
        holder.start()
        sampler = asyncio.ensure_future(sample_engine_counters())
        yield
        sampler.cancel()
        for service in services.values():
            service.close()
        holder.close()

    app = FastAPI(title="Ember", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.holder, app.state.metrics, app.state.begin_drain = holder, metrics, begin_drain
    app.add_middleware(ContainErrors)
    app.add_middleware(CountResponses, metrics=metrics)  # outermost: it also counts ContainErrors' 500s

    def decoder() -> DecoderService:
        engine = holder.require()
        if holder.kind != "decoder":
            raise oa.ApiError(400, f"model {model_name!r} is an image (diffusion) engine: use "
                                   "POST /v1/images/generations", code="wrong_model_kind")
        if "decoder" not in services:
            services["decoder"] = DecoderService(engine, limits, metrics, model_name, folder)
        return services["decoder"]

    def images():  # imported lazily: the diffusion runtime is optional
        engine = holder.require()
        if holder.kind != "diffusion":
            raise oa.ApiError(400, f"model {model_name!r} is a text (decoder) engine and cannot generate images: "
                                   "serve a diffusion engine folder for /v1/images/generations",
                              code="wrong_model_kind")
        if "images" not in services:
            from ember.server.images import ImageService

            services["images"] = ImageService(engine, limits, metrics, model_name)
        return services["images"]

    @app.exception_handler(oa.ApiError)
    async def api_error(request: Request, e: oa.ApiError) -> JSONResponse:
        return ErrorResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(InputError)
    async def input_error(request: Request, e: InputError) -> JSONResponse:  # one no handler turned into an ApiError
        return ErrorResponse(oa.error_body(str(e)), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return ErrorResponse(oa.error_body(f"{request.method} {request.url.path}: {e.detail}"),
                             status_code=e.status_code, headers=e.headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": holder.state, "model": model_name, "kind": holder.kind or None}
        if holder.error:
            body["error"] = holder.error
        if holder.state == READY:
            body["stats"] = holder.engine.stats() if holder.kind == "decoder" else None
            return JSONResponse(body)
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    v1 = APIRouter(dependencies=[Depends(api_key_check(api_key))])

    @v1.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        engine = holder.engine if holder.state == READY else None
        stats = engine.stats() if engine is not None and hasattr(engine, "stats") else None
        return PlainTextResponse(metrics.render(stats, holder.state), media_type="text/plain; version=0.0.4")

    @v1.get("/v1/models")
    async def models() -> JSONResponse:
        created = int(holder.loaded_at or 0)
        return JSONResponse(oa.models_body(model_name, created, holder.kind or holder.state))

    @v1.post("/v1/completions")
    async def completions(request: Request) -> Response:
        service = decoder()
        return await service.completions(await read_json(request, limits), request.receive)

    @v1.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        service = decoder()
        return await service.chat_completions(await read_json(request, limits), request.receive)

    @v1.post("/v1/images/generations")
    async def image_generations(request: Request) -> Response:
        service = images()
        return await service.generate(await read_json(request, limits), request.receive)

    app.include_router(v1)
    return app
