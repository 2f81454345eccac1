"""The HTTP API (FastAPI). Every error is a JSON body {"error", "detail"} with a 4xx status.

No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.
"""


import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated, AsyncIterator

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from app.admin import admin_router
from app.body import read_body
from app.files import append_line
from app.keys import KeyStore, RateLimiter, key_file
from app.metrics import CONTENT_TYPE, Metrics
from app.model_runner import GenerationParams, ModelRunner
from app.service import InferenceService
from app.settings import ServerSettings
from app.training.jobs import JobManager
from client_sdk.errors import WireFormatError
from client_sdk.schemas import BundleInfo, ErrorResponse, GenerateResponse

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 415, 422, 429)}
ADMIN_ERRORS = {status: {"model": ErrorResponse} for status in (401, 403, 404, 409, 413, 415, 422)}
PAYLOAD_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary", "description": "a veil wire-format payload"}}}}}


def error(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content=ErrorResponse(error=kind, detail=detail).model_dump())


ACCESS_LOG = logging.getLogger("veil.access")
"""One JSON line per request: route, status, seconds, bytes in. Never a body, a prompt or a generated text."""


def sse(event: str | None, data: str) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


def create_app(settings: ServerSettings | None = None, runner: ModelRunner | None = None) -> FastAPI:
    """The app; loads `settings.model` at startup unless a ready `runner` is given (tests do)."""
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = runner or await run_in_threadpool(ModelRunner.load, settings.model, settings.cache_dir,
                                                   settings.device)
        app.state.service = InferenceService(loaded, settings)
        app.state.jobs = JobManager(loaded, settings, on_artifact=app.state.service.reload)
        yield
        await run_in_threadpool(app.state.jobs.close)
        await run_in_threadpool(app.state.service.batcher.close)

    app = FastAPI(title="veil", version="0.1.0", lifespan=lifespan,
                  description="Private split inference: the prompt arrives privatized by the DEL mechanism.")
    metrics = app.state.metrics = Metrics()

    @app.middleware("http")
    async def observe(request: Request, call_next) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        seconds = time.perf_counter() - start
        metrics.requests.labels(route=route, status=str(response.status_code)).inc()
        metrics.latency.labels(route=route).observe(seconds)
        ACCESS_LOG.info(json.dumps({"method": request.method, "route": route, "status": response.status_code,
                                    "seconds": round(seconds, 4),
                                    "bytes_in": int(request.headers.get("content-length") or 0)}))
        if (route.startswith("/admin") and request.method != "GET") or response.status_code in (401, 403):
            audit(request, route, response.status_code)
        return response

    def audit(request: Request, route: str, status: int) -> None:
        """Every admin change and every refused key, to `<cache>/audit.log` (JSON lines; never a body)."""
        append_line(settings.cache_dir / "audit.log", json.dumps({
            "time": time.time(), "client": request.client.host if request.client else None,
            "method": request.method, "route": route, "path_params": request.path_params, "status": status}))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
                422: "invalid_parameter", 429: "rate_limited"}.get(exc.status_code, "http_error")
        headers = {**(exc.headers or {}), **({"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else {})}
        return error(exc.status_code, kind, str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error(422, "invalid_parameter", detail)

    @app.exception_handler(WireFormatError)
    async def wire_error(_: Request, exc: WireFormatError) -> JSONResponse:
        return error(400, "bad_payload", str(exc))

    def service(request: Request) -> InferenceService:
        return request.app.state.service

    keys, limiter = KeyStore(key_file(settings)), RateLimiter(settings.rate_limit_per_minute)

    def client_access(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        """The client key (when required) and the rate limit, per key or else per client address."""
        caller = request.client.host if request.client else "unknown"
        if settings.require_api_key:
            scheme, _, key = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not key:
                raise HTTPException(401, "API key required: Authorization: Bearer <key>")
            record = keys.verify(key)
            if record is None:
                raise HTTPException(403, "unknown or revoked API key")
            caller = f"key:{record.id}"
        wait = limiter.acquire(caller)
        if wait > 0:
            raise HTTPException(429, f"rate limit of {settings.rate_limit_per_minute} requests a minute",
                                headers={"Retry-After": str(max(1, round(wait)))})

    client = [Depends(client_access)]

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> Response:
        """Readiness: the model is loaded and the training worker is alive."""
        service_ = getattr(request.app.state, "service", None)
        jobs = getattr(request.app.state, "jobs", None)
        if service_ is None or jobs is None or not jobs.alive():
            return error(503, "not_ready", "the model or the training worker is not up")
        return JSONResponse({"status": "ready", "model": service_.runner.model_id})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: requests, latency, payload bytes, tokens in and out, mechanism settings used."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/bundle", response_model=BundleInfo, responses=ERRORS, dependencies=client)
    async def bundle(request: Request) -> BundleInfo:
        """Metadata for the client: model, vocab, projections, soft prompts, and where the files are."""
        return service(request).bundle

    @app.get("/v1/bundle/tokenizer.json", responses=ERRORS, dependencies=client)
    async def tokenizer(request: Request) -> Response:
        """The tokenizer (Hugging Face tokenizers JSON)."""
        return Response(service(request).tokenizer_bytes, media_type="application/json")

    @app.get("/v1/bundle/projections/{projection_id}", responses=ERRORS, dependencies=client)
    async def projected_table(request: Request, projection_id: str) -> Response:
        """A projected table (vocab x k), safetensors: int8 `table` times per-column `scale`."""
        published = service(request).catalog.projections.get(projection_id)
        if published is None:
            raise HTTPException(404, f"no projection {projection_id!r}")
        return Response(published.table_bytes, media_type="application/octet-stream")

    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS, openapi_extra=PAYLOAD_BODY,
              dependencies=client)
    async def generate(
        request: Request,
        max_new_tokens: Annotated[int, Query(ge=1, le=settings.max_new_tokens)] = 64,
        temperature: Annotated[float, Query(ge=0.0, le=5.0, description="0 means greedy")] = 0.0,
        top_p: Annotated[float, Query(gt=0.0, le=1.0)] = 1.0,
        seed: Annotated[int | None, Query(ge=0, lt=2**63)] = None,
        stop: Annotated[list[str] | None, Query(max_length=8, description="stop strings")] = None,
        stream: bool = False,
    ) -> Response:
        """Generate from a privatized prompt (binary body); `stream=true` answers with Server-Sent Events."""
        svc = service(request)
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type != "application/octet-stream":
            raise HTTPException(415, f"the body must be application/octet-stream, got {content_type or 'none'!r}")
        if stop and any(not s for s in stop):
            raise HTTPException(422, "stop strings must not be empty")
        body = await read_body(request, svc.max_payload_bytes)
        prepared = await run_in_threadpool(svc.prepare, body)
        metrics.received(len(body), prepared.prompt_tokens, prepared.params)
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                  stop=tuple(stop or ()))
        if not stream:
            answer = await run_in_threadpool(svc.generate, prepared, params)
            metrics.completion_tokens.inc(answer.completion_tokens)
            return JSONResponse(answer.model_dump())

        async def events() -> AsyncIterator[str]:
            cancelled = threading.Event()
            pieces = svc.stream(prepared, params, cancelled)

            def advance() -> tuple[str, GenerateResponse | None]:
                try:
                    return next(pieces), None
                except StopIteration as end:
                    return "", end.value

            try:
                while True:
                    piece, final = await run_in_threadpool(advance)
                    if final is not None:
                        metrics.completion_tokens.inc(final.completion_tokens)
                        yield sse("done", final.model_dump_json())
                        return
                    yield sse(None, json.dumps({"text": piece}))
            except Exception as exc:  # the status line is already sent: report in-band
                yield sse("error", json.dumps({"error": "generation_failed", "detail": str(exc)}))
            finally:  # also when the client disconnects (the task is cancelled): stop at the next token
                cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    app.include_router(admin_router(settings), responses=ADMIN_ERRORS)
    return app
