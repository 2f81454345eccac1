"""The admin API: upload training data, train projections and soft prompts as background jobs, and manage
the artifacts the server serves. Every route needs `Authorization: Bearer <admin key>`.

No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.
"""

import hashlib
import hmac
from pathlib import Path
from typing import Annotated, Any, Callable, Coroutine, Literal

from fastapi import APIRouter, Request
from fastapi import Path as PathParameter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from app.access import Throttle, bearer_key, client_address
from app.artifacts import ArtifactError, artifact_dir, delete_artifact, manifests, read_manifest, set_active
from app.body import media_type, read_body
from app.files import write_bytes_atomic
from app.service import InferenceService
from app.settings import ServerSettings
from app.training.config import load_text
from app.training.data import DataError, parse_upload, text_sha256
from app.training.dp_soft_prompt import TENANT, DPSoftPromptConfig
from app.training.jobs import Job, JobConflict, JobManager, artifact_root, tenant_budgets, upload_dir
from app.training.projection import ProjectionConfig
from app.training.soft_prompt import SoftPromptConfig
from app.training.tenant_budget import BudgetExceeded

ArtifactKind = Literal["projections", "soft-prompts"]
UPLOAD_TYPES = {"text/plain", "application/jsonl", "application/x-ndjson", "application/octet-stream"}
OWN_BODY = {"/admin/uploads"}
"""Admin routes that read their body themselves (after checking its media type), with their own size limit."""


class ProjectionJobRequest(ProjectionConfig):
    activate: bool = False
    """Serve the projection as soon as it is trained."""


class SoftPromptJobRequest(SoftPromptConfig):
    activate: bool = False


class DPSoftPromptJobRequest(DPSoftPromptConfig):
    activate: bool = False


class BudgetLimit(BaseModel):
    epsilon: float = Field(ge=0, le=1e6, description="total training epsilon allowed on the tenant's data")


class TenantBudgetReport(BaseModel):
    tenant: str
    limit: float
    spent: float
    remaining: float
    delta_spent: float
    charges: list[dict]


JOB_REQUESTS = {ProjectionJobRequest: ProjectionConfig, SoftPromptJobRequest: SoftPromptConfig,
                DPSoftPromptJobRequest: DPSoftPromptConfig}


class Upload(BaseModel):
    data: str
    """Pass this as `data` to a training job."""
    sha256: str
    bytes: int
    characters: int


class Artifact(BaseModel):
    name: str
    active: bool
    manifest: dict


def admin_route_class(settings: ServerSettings, throttle: Throttle) -> type[APIRoute]:
    """Admin routes check the caller (key, then the failure throttle) before anything reads the body, then read the body
    within its size and time limits: FastAPI would otherwise parse a JSON body before any dependency runs."""
    expected = (hashlib.sha256(settings.admin_key.get_secret_value().encode()).digest()
                if settings.admin_key else None)

    def require_admin(request: Request) -> None:
        if expected is None:
            raise HTTPException(403, "the admin API is disabled: set VEIL_ADMIN_KEY to enable it")
        key = bearer_key(request.headers.get("authorization"))
        if key is None or not hmac.compare_digest(hashlib.sha256(key.encode()).digest(), expected):
            throttle.failed(client_address(request))
            if key is None:
                raise HTTPException(401, "admin key required: Authorization: Bearer <key>")
            raise HTTPException(403, "wrong admin key")

    class AdminRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()
            reads_own_body = self.path_format in OWN_BODY

            async def guarded(request: Request) -> Response:
                require_admin(request)
                if not reads_own_body:  # cached where FastAPI's own body parsing finds it
                    request._body = await read_body(request, settings.max_admin_json_bytes)
                return await handler(request)

            return guarded

    return AdminRoute


def admin_router(settings: ServerSettings, throttle: Throttle) -> APIRouter:
    """The /admin routes, protected by `settings.admin_key`."""
    router = APIRouter(prefix="/admin", tags=["admin"], route_class=admin_route_class(settings, throttle))

    def service(request: Request) -> InferenceService:
        return request.app.state.service

    def jobs(request: Request) -> JobManager:
        return request.app.state.jobs

    def root(kind: ArtifactKind) -> Path:
        return artifact_root(settings, "projection" if kind == "projections" else "soft_prompt")

    def submit(request: Request, body: ProjectionJobRequest | SoftPromptJobRequest | DPSoftPromptJobRequest) -> Job:
        try:
            load_text(body.data, settings.data_dir, upload_dir(settings))
        except DataError as err:
            raise HTTPException(422, str(err)) from None
        config = JOB_REQUESTS[type(body)](**body.model_dump(exclude={"activate"}))
        manager = jobs(request)
        if isinstance(config, SoftPromptConfig) and config.projection_id not in manager.projections():
            raise HTTPException(422, f"no projection {config.projection_id!r} on this server")
        try:
            return manager.submit(config, activate=body.activate)
        except (BudgetExceeded, JobConflict) as err:
            raise HTTPException(409, str(err)) from None

    @router.post("/uploads", status_code=201, response_model=Upload)
    async def upload(request: Request) -> Upload:
        """Upload training text: plain UTF-8, or JSONL with a "text" field per line."""
        content_type = media_type(request)
        if content_type not in UPLOAD_TYPES:
            raise HTTPException(415, f"upload text/plain or application/jsonl, not {content_type or 'nothing'!r}")
        data = await read_body(request, settings.max_upload_bytes)
        return await run_in_threadpool(store_upload, data)  # parsing 64 MB must not stall the event loop

    def store_upload(data: bytes) -> Upload:
        try:
            text = parse_upload(data)
        except DataError as err:
            raise HTTPException(422, str(err)) from None
        digest = hashlib.sha256(data).hexdigest()
        write_bytes_atomic(upload_dir(settings) / f"{digest}.txt", data)
        return Upload(data=f"upload:{digest}", sha256=text_sha256(text), bytes=len(data), characters=len(text))

    @router.post("/projections", status_code=202, response_model=Job)
    async def train_projection(request: Request, body: ProjectionJobRequest) -> Job:
        """Start training a projection (a background job)."""
        return await run_in_threadpool(submit, request, body)

    @router.post("/soft-prompts", status_code=202, response_model=Job)
    async def train_soft_prompt(request: Request, body: SoftPromptJobRequest) -> Job:
        """Start training a soft prompt for one (projection, n, mu) (a background job)."""
        return await run_in_threadpool(submit, request, body)

    @router.post("/dp-soft-prompts", status_code=202, response_model=Job)
    async def train_dp_soft_prompt(request: Request, body: DPSoftPromptJobRequest) -> Job:
        """Start DP-SGD training of a soft prompt on a tenant's data; its target epsilon is charged to the tenant's
        training budget first (409 if it does not fit)."""
        return await run_in_threadpool(submit, request, body)

    @router.get("/tenants/{tenant}/budget", response_model=TenantBudgetReport)
    async def get_budget(tenant: Annotated[str, PathParameter(pattern=TENANT)]) -> TenantBudgetReport:
        """A tenant's training-epsilon limit, what their DP jobs have spent, and the charges."""
        return TenantBudgetReport(**tenant_budgets(settings).get(tenant).report())

    @router.put("/tenants/{tenant}/budget", response_model=TenantBudgetReport)
    async def set_budget(tenant: Annotated[str, PathParameter(pattern=TENANT)], body: BudgetLimit) -> TenantBudgetReport:
        """Set a tenant's total training-epsilon limit (charges already made stay)."""
        return TenantBudgetReport(**tenant_budgets(settings).set_limit(tenant, body.epsilon).report())

    @router.get("/jobs", response_model=list[Job])
    async def list_jobs(request: Request) -> list[Job]:
        return jobs(request).list()

    def job_action(request: Request, job_id: str, action: str) -> Job:
        manager = jobs(request)
        try:
            return {"get": manager.get, "cancel": manager.cancel, "resume": manager.resume}[action](job_id)
        except KeyError:
            raise HTTPException(404, f"no job {job_id!r}") from None
        except JobConflict as err:
            raise HTTPException(409, str(err)) from None

    @router.get("/jobs/{job_id}", response_model=Job)
    async def get_job(request: Request, job_id: str) -> Job:
        """State, progress (step of steps) and the loss curve so far."""
        return job_action(request, job_id, "get")

    @router.post("/jobs/{job_id}/cancel", response_model=Job)
    async def cancel_job(request: Request, job_id: str) -> Job:
        """Cancel a queued or running job (a running one stops at its next step, keeping its checkpoint)."""
        return job_action(request, job_id, "cancel")

    @router.post("/jobs/{job_id}/resume", response_model=Job)
    async def resume_job(request: Request, job_id: str) -> Job:
        """Queue an interrupted, failed or cancelled job again, from its last checkpoint."""
        return job_action(request, job_id, "resume")

    @router.get("/{kind}", response_model=list[Artifact])
    async def list_artifacts(kind: ArtifactKind) -> list[Artifact]:
        """Every artifact of this kind on disk, for any model, served or not."""
        return [Artifact(name=name, active=bool(m.get("active")), manifest=m)
                for name, m in manifests(root(kind)).items()]

    def change(request: Request, kind: ArtifactKind, name: str, action: str) -> Artifact:
        try:
            directory = artifact_dir(root(kind), name)
            if kind == "projections" and action != "activate" and (dependents := jobs(request).dependents(directory)):
                raise HTTPException(409, f"projection {name!r} is used by {', '.join(dependents)}: deactivate or "
                                         "delete those first (or wait for the jobs)")
            if kind == "soft-prompts" and action == "activate" and \
                    (target := read_manifest(directory).get("projection_id")) not in service(request).catalog.projections:
                raise HTTPException(409, f"soft prompt {name!r} is for projection {target}, which this server does not "
                                         "serve: activate that projection first")
            if action == "delete":
                delete_artifact(directory)
                manifest = None
            else:
                manifest = set_active(directory, action == "activate")
        except ArtifactError as err:
            raise HTTPException(404, str(err)) from None
        service(request).reload()
        return Artifact(name=name, active=action == "activate", manifest=manifest or {})

    @router.post("/{kind}/{name}/activate", response_model=Artifact)
    async def activate(request: Request, kind: ArtifactKind, name: str) -> Artifact:
        """Serve this artifact (it appears in the bundle); a soft prompt only if its projection is served (else 409)."""
        return await run_in_threadpool(change, request, kind, name, "activate")

    @router.post("/{kind}/{name}/deactivate", response_model=Artifact)
    async def deactivate(request: Request, kind: ArtifactKind, name: str) -> Artifact:
        """Stop serving this artifact; it stays on disk. A projection that active soft prompts or unfinished jobs use
        is refused (409, naming them)."""
        return await run_in_threadpool(change, request, kind, name, "deactivate")

    @router.delete("/{kind}/{name}", response_model=Artifact)
    async def delete(request: Request, kind: ArtifactKind, name: str) -> Artifact:
        """Delete this artifact from disk (and stop serving it); a projection that active soft prompts or unfinished
        jobs use is refused (409, naming them)."""
        return await run_in_threadpool(change, request, kind, name, "delete")

    return router
