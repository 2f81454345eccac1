"""The HTTP app (FastAPI): lifespan, observability, error bodies, and the routers (app/routes, app/admin); and
how `veil serve` runs it under uvicorn (`uvicorn_options`).

Every error is a JSON body {"error", "detail"} (see app/errors.py).
"""

import copy
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from uvicorn.config import LOGGING_CONFIG

from app.access import ClientAccess, Throttle
from app.admin import admin_router
from app.errors import install_error_handlers
from app.files import remove_leftovers
from app.metrics import Metrics
from app.model_runner import ModelRunner
from app.observability import install_observability
from app.provenance import log_startup
from app.routes.generate import generate_router
from app.routes.public import public_router
from app.service import InferenceService
from app.settings import ServerSettings
from app.training.jobs import JobManager
from client_sdk.schemas import ErrorResponse

ADMIN_ERRORS = {status: {"model": ErrorResponse} for status in (401, 403, 404, 409, 413, 415, 422)}


def create_app(settings: ServerSettings | None = None, runner: ModelRunner | None = None,
               jobs: Callable[..., JobManager] = JobManager) -> FastAPI:
    """The app; loads `settings.model` at startup unless a ready `runner` is given (tests do).

    `jobs` builds the training-job manager from (runner, settings, on_artifact): by default one that trains in
    this process; Ray Serve replicas pass one that forwards to the deployment's training worker (app/ray_serve.py).
    """
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = runner or await run_in_threadpool(ModelRunner.load, settings.model, settings.cache_dir,
                                                   settings.device)
        for root in (settings.projection_dir, settings.soft_prompt_dir):  # what writes cut short by a crash left
            await run_in_threadpool(remove_leftovers, root)
        app.state.service = InferenceService(loaded, settings)
        log_startup(app.state.service)
        app.state.jobs = jobs(loaded, settings, on_artifact=app.state.service.reload)
        yield
        await run_in_threadpool(app.state.jobs.close)
        await run_in_threadpool(app.state.service.backend.close)

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="veil", version="0.1.0", lifespan=lifespan, **docs,
                  description="Private split inference: the prompt arrives privatized by the DEL mechanism.")
    app.state.settings, app.state.metrics = settings, Metrics()
    install_observability(app, settings, app.state.metrics)
    install_error_handlers(app)
    throttle = Throttle(settings)
    access = ClientAccess(settings, throttle)
    app.include_router(public_router(access))
    app.include_router(generate_router(settings, access))
    app.include_router(admin_router(settings, throttle), responses=ADMIN_ERRORS)
    return app


MAX_REQUEST_HEAD_BYTES = 16 * 1024
"""A request line and headers still incomplete past this many bytes get 400 (h11 checks after each read of up to
64 KiB, so a head that arrives in one read may be up to that)."""


def uvicorn_options(settings: ServerSettings) -> dict:
    """How `veil serve` runs the app: forwarded headers believed only from `trusted_proxies` (none by default),
    uvicorn's own access log off unless asked for (it prints query strings, which carry user text), the
    `veil.access` JSON lines on stdout, and the h11 parser with its bound on a request head (httptools, which
    uvicorn prefers when it is installed, buffers headers of any size)."""
    trusted = settings.trusted_proxies.strip()
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["formatters"]["json_lines"] = {"format": "%(message)s"}
    log_config["handlers"]["json_lines"] = {"class": "logging.StreamHandler", "formatter": "json_lines",
                                            "stream": "ext://sys.stdout"}
    log_config["loggers"]["veil"] = {"handlers": ["json_lines"], "level": "INFO", "propagate": False}
    return {"host": settings.host, "port": settings.port, "proxy_headers": bool(trusted),
            "forwarded_allow_ips": trusted or None, "access_log": settings.uvicorn_access_log,
            "log_config": log_config, "http": "h11", "h11_max_incomplete_event_size": MAX_REQUEST_HEAD_BYTES}
