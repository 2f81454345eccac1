"""POST /v1/generate: a privatized prompt in (binary wire payload), the answer out, as JSON or Server-Sent Events.

Every generation stops at the next token once its client goes away: a stream when the SSE response is torn down,
a plain request when the server sees the connection close while it waits (`http.disconnect`).
"""

import asyncio
import json
import logging
import threading
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from app.access import ClientAccess
from app.body import media_type, read_body
from app.engine.request import GenerationParams
from app.engine.text import MAX_STOP_STRINGS, check_stop
from app.errors import DeadlineExceeded
from app.routes.public import ERRORS, service
from app.settings import ServerSettings
from client_sdk.schemas import GenerateResponse

LOG = logging.getLogger("veil.generate")
PAYLOAD_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary", "description": "a veil wire-format payload"}}}}}
CLIENT_CLOSED = 499
"""The status logged for a request whose client went away before its answer (nginx's convention)."""


class CancellingEventSource(EventSourceResponse):
    """Server-Sent Events that set the generation's cancel event however the response ends (even before the
    event generator first runs)."""

    def __init__(self, content: AsyncIterator[dict], cancelled: threading.Event) -> None:
        super().__init__(content)
        self.cancelled = cancelled

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancelled.set()


async def cancel_on_disconnect(request: Request, cancelled: threading.Event) -> None:
    """Set `cancelled` when the client closes the connection (the body is read: what comes next is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancelled.set()


def generate_router(settings: ServerSettings, access: ClientAccess) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS, openapi_extra=PAYLOAD_BODY,
                 dependencies=[Depends(access)])
    async def generate(
        request: Request,
        max_new_tokens: Annotated[int, Query(ge=1, le=settings.max_new_tokens)] = 64,
        temperature: Annotated[float, Query(ge=0.0, le=5.0, description="0 means greedy")] = 0.0,
        top_p: Annotated[float, Query(gt=0.0, le=1.0)] = 1.0,
        seed: Annotated[int | None, Query(ge=0, lt=2**63)] = None,
        stop: Annotated[list[str] | None, Query(max_length=MAX_STOP_STRINGS, description="stop strings")] = None,
        stream: bool = False,
    ) -> Response:
        """Generate from a privatized prompt (binary body); `stream=true` answers with Server-Sent Events."""
        svc, metrics = service(request), request.app.state.metrics
        content_type = media_type(request)
        if content_type != "application/octet-stream":
            raise HTTPException(415, f"the body must be application/octet-stream, got {content_type or 'none'!r}")
        stop = tuple(stop or ())
        if refused := check_stop(stop, svc.runner.tokenizer):
            raise HTTPException(422, refused)
        body = await read_body(request, svc.max_payload_bytes)
        prepared = await run_in_threadpool(svc.prepare, body, request.state.tenant)
        metrics.received(len(body), prepared.prompt_tokens, prepared.params)
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                  stop=stop)
        cancelled = threading.Event()
        if not stream:
            watcher = asyncio.create_task(cancel_on_disconnect(request, cancelled))
            try:
                answer = await svc.generate_async(prepared, params, cancelled)
            finally:
                watcher.cancel()
            if cancelled.is_set():  # nobody is there to read it
                return Response(status_code=CLIENT_CLOSED)
            metrics.completion_tokens.inc(answer.completion_tokens)
            return JSONResponse(answer.model_dump())

        pieces = svc.stream(prepared, params, cancelled)  # queued now: a full queue answers 503, not an event

        async def events() -> AsyncIterator[dict]:
            try:
                async for piece in pieces:
                    if isinstance(piece, GenerateResponse):
                        metrics.completion_tokens.inc(piece.completion_tokens)
                        yield {"event": "done", "data": piece.model_dump_json()}
                    else:
                        yield {"data": json.dumps({"text": piece})}
            except DeadlineExceeded as exc:  # the status line is already sent: report in-band
                yield {"event": "error", "data": json.dumps({"error": "deadline_exceeded", "detail": str(exc)})}
            except Exception:  # the cause goes to the log, never to the client
                LOG.exception("a streamed generation failed")
                yield {"event": "error", "data": json.dumps({"error": "generation_failed",
                                                             "detail": "the generation failed; see the server log"})}

        return CancellingEventSource(events(), cancelled)

    return router
