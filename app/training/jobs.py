"""Training runs as jobs: one function that runs a config to an artifact (the CLI calls it directly), and a
manager that runs them one at a time in a background thread for the admin API, with state on disk."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from enum import Enum
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, Field

from app.artifacts import delete_artifact, manifests, set_active
from app.files import write_bytes_atomic
from app.model_runner import ModelRunner
from app.reconstruction import Projection, load_projection
from app.service import published_projections
from app.settings import ServerSettings
from app.soft_prompts import below_floor, load_soft_prompt, record_floor_check
from app.training.config import UPLOAD, load_text
from app.training.data import missing_files
from app.training.floor import floor_check
from app.training.dp_soft_prompt import DPSoftPromptConfig, train_dp_soft_prompt
from app.training.loop import Cancelled
from app.training.projection import ProjectionConfig, train_projection
from app.training.soft_prompt import SoftPromptConfig, train_soft_prompt
from app.training.synth import synthesize_chat
from app.training.tenant_budget import TenantBudgets

JobConfig = ProjectionConfig | SoftPromptConfig | DPSoftPromptConfig
JobKind = Literal["projection", "soft_prompt", "dp_soft_prompt"]
CONFIGS: dict[str, type[JobConfig]] = {"projection": ProjectionConfig, "soft_prompt": SoftPromptConfig,
                                       "dp_soft_prompt": DPSoftPromptConfig}


def job_kind(config: JobConfig) -> JobKind:
    return next(kind for kind, config_type in CONFIGS.items() if type(config) is config_type)


def upload_dir(settings: ServerSettings) -> Path:
    return settings.cache_dir / "uploads"


def artifact_root(settings: ServerSettings, kind: str) -> Path:
    """Where artifacts of `kind` ("projection", "soft_prompt" or "dp_soft_prompt") live."""
    return settings.projection_dir if kind == "projection" else settings.soft_prompt_dir


def tenant_budgets(settings: ServerSettings) -> TenantBudgets:
    return TenantBudgets(settings.cache_dir / "tenant-budgets.json", settings.tenant_training_epsilon)


def charge_tenant(settings: ServerSettings, config: DPSoftPromptConfig, job_id: str) -> None:
    """Charge a DP job's target epsilon to its tenant before it starts (BudgetExceeded if it does not fit).

    delta defaults to min(1e-5, 1/n), so 1e-5 bounds it when the config leaves it to the data.
    """
    tenant_budgets(settings).charge(config.tenant, job_id, config.target_epsilon, config.delta or 1e-5)


def current_projections(runner: ModelRunner, settings: ServerSettings) -> dict[str, Projection]:
    """Every projection a soft prompt may be trained for: all trained ones for this model (served or not), and PCA."""
    return {pid: p.projection for pid, p in published_projections(runner, settings, active_only=False)[0].items()}


def floor_text(settings: ServerSettings, config: JobConfig) -> str | None:
    """The held-out text a soft prompt is checked on, or None (no check asked for, or the corpus is not here)."""
    if isinstance(config, ProjectionConfig) or config.floor_data is None:
        return None
    if not UPLOAD.match(config.floor_data) and missing_files(config.floor_data, settings.data_dir):
        return None
    return load_text(config.floor_data, settings.data_dir, upload_dir(settings))


def check_against_floor(runner: ModelRunner, config: SoftPromptConfig, projection: Projection, directory: Path,
                        held_out: str | None) -> dict:
    """Score the trained prompt on its held-out text against sending nothing and record it (floor.py)."""
    if held_out is None:
        return record_floor_check(directory, {"passes": None, "reason": f"held-out corpus {config.floor_data!r} is "
                                                                         "not on this machine: not checked"})
    check = floor_check(runner, projection, config.bits, config.mu, load_soft_prompt(directory).embeddings, held_out,
                        config.floor_data, prefix_tokens=config.prefix_tokens,
                        continuation_tokens=config.continuation_tokens, segments=config.floor_segments,
                        seed=config.seed)
    return record_floor_check(directory, check)


def training_chat(runner: ModelRunner, settings: ServerSettings, config: SoftPromptConfig,
                  text: str) -> torch.Tensor | None:
    """The chat examples a soft prompt trains on with its prose (None without `chat_examples`), cached on the server."""
    if not config.chat_examples:
        return None
    return synthesize_chat(runner, text, config.chat_examples, prefix_tokens=config.prefix_tokens,
                           continuation_tokens=config.continuation_tokens, seed=config.seed,
                           max_new_tokens=min(48, config.continuation_tokens), cache_dir=settings.cache_dir / "synth")


def run_training(runner: ModelRunner, settings: ServerSettings, config: JobConfig,
                 projections: dict[str, Projection], *, activate: bool = False, checkpoint: Path | None = None,
                 cancel: threading.Event | None = None,
                 on_step: Callable[[int, float | None], None] | None = None) -> dict:
    """Run one training config to its artifact (served if `activate`) and drop its checkpoint; returns the manifest.

    `projections` (by id) are those a soft prompt may target. A soft prompt is checked on its held-out text
    (`floor_data`) and one worse than sending nothing there is not activated (its manifest says why). DP runs take
    no checkpoint: a resumed one starts over (its tenant was charged once, and only the finished prompt is ever
    released).
    """
    text = load_text(config.data, settings.data_dir, upload_dir(settings))
    held_out = floor_text(settings, config)
    if isinstance(config, ProjectionConfig):
        manifest = train_projection(runner, config, text, settings.projection_dir, checkpoint=checkpoint,
                                    cancel=cancel, on_step=on_step)
    elif config.projection_id not in projections:
        raise ValueError(f"no projection {config.projection_id!r} on this server; known: {', '.join(projections)}")
    elif isinstance(config, DPSoftPromptConfig):
        manifest = train_dp_soft_prompt(runner, projections[config.projection_id], config, text,
                                        settings.soft_prompt_dir, cancel=cancel, on_step=on_step)
    else:
        chat = training_chat(runner, settings, config, text)
        manifest = train_soft_prompt(runner, projections[config.projection_id], config, text,
                                     settings.soft_prompt_dir, chat=chat, checkpoint=checkpoint, cancel=cancel,
                                     on_step=on_step)
    directory = artifact_root(settings, manifest["kind"]) / config.name
    if not isinstance(config, ProjectionConfig) and config.projection_id not in current_projections(runner, settings):
        delete_artifact(directory)  # a soft prompt for a projection that is gone would never be served
        raise ValueError(f"projection {config.projection_id!r} was deleted while the job ran; nothing was kept")
    if not isinstance(config, ProjectionConfig) and config.floor_data is not None:
        checked = check_against_floor(runner, config, projections[config.projection_id], directory, held_out)
        # the in-memory manifest keeps what a DP artifact's file does not (its training record, for the job)
        manifest |= {k: checked[k] for k in ("floor_check", "active", "inactive_reason") if k in checked}
    if activate and not isinstance(config, ProjectionConfig) and \
            config.projection_id not in published_projections(runner, settings)[0]:  # listed active, never served
        reason = f"projection {config.projection_id} is not served: activate it, then this soft prompt"
        manifest = {**manifest, **set_active(directory, False, reason=reason)}
    elif activate and not below_floor(manifest):
        set_active(directory, True)
        manifest = {**manifest, "active": True}
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return manifest


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    interrupted = "interrupted"
    """The server stopped while the job was queued or running; resume continues from its checkpoint."""


UNFINISHED = (JobState.queued, JobState.running)


class Job(BaseModel):
    """A training job as the admin API reports it (and as it is kept on disk)."""

    id: str
    kind: JobKind
    state: JobState = JobState.queued
    config: dict
    activate: bool = False
    step: int = 0
    steps: int
    losses: list[float | None] = []  # None: a DP step whose Poisson batch was empty
    created: float = Field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    held_out: dict[str, float] = Field(default_factory=dict, description="held-out losses of the artifact")

    def parsed_config(self) -> JobConfig:
        return CONFIGS[self.kind](**self.config)


class JobManager:
    """Runs training jobs one at a time on a background thread; each job's state is a JSON file on disk.

    `on_artifact` is called after a job writes its artifact (the service reloads what it serves).
    """

    def __init__(self, runner: ModelRunner, settings: ServerSettings, on_artifact: Callable[[], None]):
        self.runner, self.settings, self.on_artifact = runner, settings, on_artifact
        self.root = settings.cache_dir / "jobs"
        self._lock = threading.Lock()
        self._submitting = threading.Lock()  # a name check and the enqueue that reserves the name, together
        self._jobs: dict[str, Job] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._closing = False
        for path in sorted(self.root.glob("*/job.json")):
            job = Job.model_validate_json(path.read_text())
            if job.state in (JobState.queued, JobState.running):
                job.state = JobState.interrupted
                self._save(job)
            self._jobs[job.id] = job
        self._worker = threading.Thread(target=self._work, name="veil-training", daemon=True)
        self._worker.start()

    def projections(self) -> dict[str, Projection]:
        """Every projection a soft prompt may be trained for: all trained ones for this model, and PCA."""
        return current_projections(self.runner, self.settings)

    def dependents(self, projection_dir: Path) -> list[str]:
        """What uses the trained projection in `projection_dir`: active soft prompts and unfinished jobs."""
        projection_id = load_projection(projection_dir).id
        prompts = [f"soft prompt {name!r}" for name, m in manifests(self.settings.soft_prompt_dir).items()
                   if m.get("active") and m.get("projection_id") == projection_id]
        with self._lock:
            running = [f"job {job.id}" for job in self._jobs.values()
                       if job.state in UNFINISHED and job.config.get("projection_id") == projection_id]
        return prompts + running

    def alive(self) -> bool:
        """Whether the worker thread that runs jobs is running."""
        return self._worker.is_alive()

    def submit(self, config: JobConfig, activate: bool = False) -> Job:
        """Queue a job, reserving its artifact's name (JobConflict if an artifact or an unfinished job has it); a DP
        job is charged to its tenant first (BudgetExceeded if it does not fit)."""
        job = Job(id=uuid.uuid4().hex[:16], kind=job_kind(config), config=config.model_dump(), activate=activate,
                  steps=config.steps)
        with self._submitting:
            if (artifact_root(self.settings, job.kind) / config.name).exists():
                raise JobConflict(f"an artifact named {config.name!r} exists; delete it or pick another name")
            self._check_name_free(job)
            if isinstance(config, DPSoftPromptConfig):
                charge_tenant(self.settings, config, job.id)
            self._enqueue(job)
        return job

    def resume(self, job_id: str) -> Job:
        """Queue an interrupted, failed or cancelled job again; it continues from its last checkpoint."""
        with self._submitting:
            job = self.get(job_id)
            if job.state not in (JobState.interrupted, JobState.failed, JobState.cancelled):
                raise JobConflict(f"job {job_id} is {job.state.value}; only interrupted, failed or cancelled jobs "
                                  "resume")
            self._check_name_free(job)
            job.state, job.error, job.finished = JobState.queued, None, None
            self._enqueue(job)
        return job

    def _check_name_free(self, job: Job) -> None:
        """JobConflict if another unfinished job will write an artifact of the same name and kind of folder."""
        root = artifact_root(self.settings, job.kind)
        with self._lock:
            taken = [other.id for other in self._jobs.values() if other.id != job.id and other.state in UNFINISHED
                     and artifact_root(self.settings, other.kind) == root
                     and other.config["name"] == job.config["name"]]
        if taken:
            raise JobConflict(f"job {taken[0]} is already training an artifact named {job.config['name']!r}")

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state not in (JobState.queued, JobState.running):
            raise JobConflict(f"job {job_id} is {job.state.value}; only queued or running jobs can be cancelled")
        self._cancel[job_id].set()
        if job.state == JobState.queued:
            self._finish(job, JobState.cancelled)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise KeyError(job_id)
            return self._jobs[job_id]

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def wait(self, job_id: str, timeout: float) -> Job:
        """Block until the job leaves the queued and running states (tests and scripts use this)."""
        deadline = time.monotonic() + timeout
        while self.get(job_id).state in (JobState.queued, JobState.running) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.get(job_id)

    def close(self) -> None:
        """Stop after the current step: a running job is checkpointed and left resumable."""
        self._closing = True
        for event in self._cancel.values():
            event.set()
        self._queue.put(None)
        self._worker.join(timeout=60)

    def _enqueue(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job
            self._cancel[job.id] = threading.Event()
        self._save(job)
        self._queue.put(job.id)

    def _work(self) -> None:
        while (job_id := self._queue.get()) is not None:
            job = self.get(job_id)
            if job.state != JobState.queued or self._cancel[job_id].is_set():
                continue
            job.state = JobState.running
            self._save(job)

            def on_step(step: int, loss: float | None, job: Job = job) -> None:
                job.step = step
                del job.losses[step - 1 :]  # a resumed run restarts at its checkpoint: drop repeated steps
                job.losses.append(loss)
                if step % 5 == 0:
                    self._save(job)

            try:
                self._run(job, on_step)
            except Cancelled:
                self._finish(job, JobState.interrupted if self._closing else JobState.cancelled)
            except Exception as err:  # any failure ends the job, never the worker
                job.error = f"{type(err).__name__}: {err}"
                self._finish(job, JobState.failed)
            else:
                self._finish(job, JobState.succeeded)

    def _run(self, job: Job, on_step: Callable[[int, float | None], None]) -> None:
        """Train, record the result on the job, activate the artifact if asked, and have it served."""
        checkpoint = self.root / job.id / "checkpoint.pt"
        manifest = run_training(self.runner, self.settings, job.parsed_config(), self.projections(), activate=job.activate,
                                checkpoint=checkpoint, cancel=self._cancel[job.id], on_step=on_step)
        job.step, job.losses = manifest["steps"], manifest["loss_curve"]  # also when a resumed run had no steps left
        job.held_out = {k: v for k, v in manifest.items() if k.startswith("held_out_loss")}
        if "floor_check" in manifest:
            job.held_out |= {f"floor_check_{row}": nll for row, nll in manifest["floor_check"].get("nll", {}).items()}
        self.on_artifact()  # served before the job reports success

    def _finish(self, job: Job, state: JobState) -> None:
        job.state, job.finished = state, time.time()
        self._save(job)

    def _save(self, job: Job) -> None:
        write_bytes_atomic(self.root / job.id / "job.json", job.model_dump_json(indent=2).encode())


class JobConflict(Exception):
    """The job is not in a state that allows the operation (HTTP 409)."""
