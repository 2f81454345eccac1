"""POST /v1/generate: a privatized prompt in (binary wire payload), the answer out, as JSON or Server-Sent Events."""

import json
import threading
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from app.access import ClientAccess
from app.body import read_body
from app.model_runner import GenerationParams
from app.routes.public import ERRORS, service
from app.settings import ServerSettings
from client_sdk.schemas import GenerateResponse

PAYLOAD_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary", "description": "a veil wire-format payload"}}}}}


def sse(event: str | None, data: str) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


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
        stop: Annotated[list[str] | None, Query(max_length=8, description="stop strings")] = None,
        stream: bool = False,
    ) -> Response:
        """Generate from a privatized prompt (binary body); `stream=true` answers with Server-Sent Events."""
        svc, metrics = service(request), request.app.state.metrics
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type != "application/octet-stream":
            raise HTTPException(415, f"the body must be application/octet-stream, got {content_type or 'none'!r}")
        if stop and any(not s for s in stop):
            raise HTTPException(422, "stop strings must not be empty")
        body = await read_body(request, svc.max_payload_bytes)
        prepared = await run_in_threadpool(svc.prepare, body, request.state.tenant)
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

    return router
