"""Routes that serve no private data: liveness, readiness, metrics, and the client bundle's files."""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from app.access import ClientAccess
from app.errors import error
from app.metrics import CONTENT_TYPE
from app.service import InferenceService
from client_sdk.schemas import BundleInfo, ErrorResponse

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 415, 422, 429, 503)}


def service(request: Request) -> InferenceService:
    return request.app.state.service


def public_router(access: ClientAccess) -> APIRouter:
    router = APIRouter()
    client = [Depends(access)]

    @router.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> Response:
        """Readiness: the model is loaded and the training worker is alive."""
        service_ = getattr(request.app.state, "service", None)
        jobs = getattr(request.app.state, "jobs", None)
        if service_ is None or jobs is None or not jobs.alive():
            return error(503, "not_ready", "the model or the training worker is not up")
        return JSONResponse({"status": "ready", "model": service_.runner.model_id, "backend": service_.backend_name})

    @router.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus metrics: requests, latency, payload bytes, tokens in and out, mechanism settings used."""
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    @router.get("/v1/bundle", response_model=BundleInfo, responses=ERRORS, dependencies=client)
    async def bundle(request: Request) -> BundleInfo:
        """Metadata for the client: model, vocab, projections, soft prompts (a tenant's DP prompts only to that
        tenant's keys), and where the files are."""
        catalog = service(request).catalog
        hidden = {p.name for p in catalog.soft_prompts if p.tenant not in (None, request.state.tenant)}
        if not hidden:
            return catalog.bundle
        return catalog.bundle.model_copy(
            update={"soft_prompts": [s for s in catalog.bundle.soft_prompts if s.name not in hidden]})

    @router.get("/v1/bundle/tokenizer.json", responses=ERRORS, dependencies=client)
    async def tokenizer(request: Request) -> Response:
        """The tokenizer (Hugging Face tokenizers JSON)."""
        return Response(service(request).tokenizer_bytes, media_type="application/json")

    @router.get("/v1/bundle/projections/{projection_id}", responses=ERRORS, dependencies=client)
    async def projected_table(request: Request, projection_id: str) -> Response:
        """A projected table (vocab x k), safetensors: int8 `table` times per-column `scale`."""
        published = service(request).catalog.projections.get(projection_id)
        if published is None:
            raise HTTPException(404, f"no projection {projection_id!r}")
        return Response(published.table_bytes, media_type="application/octet-stream")

    return router
