"""Per-request observability: Prometheus counters, the `veil.access` JSON log line and the admin audit log."""

import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response

from app.access import client_address
from app.files import append_line
from app.metrics import Metrics
from app.settings import ServerSettings

ACCESS_LOG = logging.getLogger("veil.access")
"""One JSON line per request: route, status, seconds, bytes in. Never a body, a prompt or a generated text."""


def install_observability(app: FastAPI, settings: ServerSettings, metrics: Metrics) -> None:
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
        if response.status_code != 429 and ((route.startswith("/admin") and request.method != "GET")
                                            or response.status_code in (401, 403)):
            audit(settings, request, route, response.status_code)
        return response


def audit(settings: ServerSettings, request: Request, route: str, status: int) -> None:
    """Every admin change and every refused key, to `<cache>/audit.log` (JSON lines; never a body), rotated to
    audit.log.1 past `audit_log_max_bytes`. Refusals past the failed-authentication limit (429) are not written."""
    append_line(settings.cache_dir / "audit.log", max_bytes=settings.audit_log_max_bytes, line=json.dumps({
        "time": time.time(), "client": client_address(request),
        "method": request.method, "route": route, "path_params": request.path_params, "status": status}))
