"""`veil serve --replicas N`: the FastAPI app as a Ray Serve deployment on a local Ray cluster (`pip install .[ray]`).

Every replica loads its own model copy and runs the whole app (privacy path, batching, admin API). What the
replicas must agree on is shared, for one host, as follows (docs/DEPLOY.md says why):

- client keys: the key file in the shared cache directory, which every replica rereads when it changes
  (app/keys.py), so a key revoked anywhere is refused by every replica from its next request;
- rate limits: the `rate_limit_storage` URI; `veil serve --replicas` starts a private Redis for it unless one is
  given, so the limit counts a caller's requests over all replicas;
- training: one `TrainingWorker` actor (its own model copy) runs every job; each replica's admin API forwards job
  calls to it, so job state reads the same from any replica;
- artifacts: on disk; each replica reloads what it serves when an artifact manifest changes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any, Callable, Iterator

import httpx
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from ray import serve

from app.api import create_app
from app.errors import Overloaded
from app.model_runner import ModelRunner
from app.settings import ServerSettings
from app.training.jobs import JobManager

REPLICA_HEADER = "X-Veil-Replica"
APP_NAME = "veil"


@ray.remote
class TrainingWorker:
    """The deployment's one JobManager: runs training jobs one at a time on its own model copy."""

    def __init__(self, settings: ServerSettings, threads: int) -> None:
        torch.set_num_threads(threads)
        runner = ModelRunner.load(settings.model, settings.cache_dir, settings.device)
        self.jobs = JobManager(runner, settings, on_artifact=lambda: None)  # replicas see artifacts on disk

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.jobs, method)(*args, **kwargs)


class RemoteJobs:
    """JobManager's interface, as the admin API and /readyz use it, over the deployment's TrainingWorker.

    Takes JobManager's constructor arguments (to stand in for it in `create_app`) but needs none of them: the
    worker has its own model, and replicas notice new artifacts on disk.
    """

    FORWARDED = ("projections", "submit", "resume", "cancel", "get", "list")
    TIMEOUT = 10.0
    """Seconds a call may wait for the worker (longer only while it loads its model after a restart)."""

    def __init__(self, worker: ray.actor.ActorHandle, runner: ModelRunner, settings: ServerSettings,
                 on_artifact: Callable[[], None]) -> None:
        self.worker = worker

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method not in self.FORWARDED:
            raise AttributeError(method)
        return partial(self._call, method)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return ray.get(self.worker.call.remote(method, *args, **kwargs), timeout=self.TIMEOUT)
        except ray.exceptions.RayTaskError as err:  # the worker's own exception (KeyError, JobConflict, ...)
            raise err.cause from None
        except (ray.exceptions.RayError, TimeoutError):  # dead, restarting or stuck: a 503 with Retry-After
            raise Overloaded("the training worker is not available now", retry_after=self.TIMEOUT) from None

    def alive(self) -> bool:
        try:
            return ray.get(self.worker.call.remote("alive"), timeout=2)
        except (ray.exceptions.RayError, TimeoutError):
            return False

    def close(self) -> None:
        """Nothing to stop here: the worker belongs to the deployment."""


def artifact_signature(settings: ServerSettings) -> frozenset[tuple[str, int]]:
    """Every artifact manifest with its modification time: changes when one is trained, (de)activated or deleted."""
    found = set()
    for root in (settings.projection_dir, settings.soft_prompt_dir):
        for path in root.glob("*/manifest.json"):
            try:
                found.add((str(path), path.stat().st_mtime_ns))
            except FileNotFoundError:  # deleted since the glob: the next request sees the change
                pass
    return frozenset(found)


def install_replica_state(app: FastAPI, settings: ServerSettings, replica: str) -> None:
    """Name the replica in every response, and reload the served artifacts when another process changed them."""
    seen = {"signature": artifact_signature(settings)}
    reloading = asyncio.Lock()

    @app.middleware("http")
    async def replica_state(request: Request, call_next):
        service = getattr(request.app.state, "service", None)
        if service is not None and artifact_signature(settings) != seen["signature"]:  # a few stat() calls
            async with reloading:
                signature = artifact_signature(settings)
                if signature != seen["signature"]:
                    await run_in_threadpool(service.reload)
                    seen["signature"] = signature
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = replica
        return response


@serve.ingress()
class VeilReplica:
    """One replica: the whole app with its own model copy; training goes to the shared worker."""

    def __init__(self, settings: ServerSettings, worker: ray.actor.ActorHandle, threads: int) -> None:
        torch.set_num_threads(threads)
        self.settings, self.worker = settings, worker

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.settings, jobs=partial(RemoteJobs, self.worker))
        install_replica_state(app, self.settings, serve.get_replica_context().replica_id.unique_id)
        return app


def threads_per_replica(max_replicas: int) -> int:
    """Torch threads for each replica: the host's cores shared out, so replicas do not oversubscribe them."""
    return max(1, (os.cpu_count() or 1) // max_replicas)


@contextmanager
def deployment(settings: ServerSettings, replicas: int = 1, *, min_replicas: int | None = None,
               max_replicas: int | None = None, startup_timeout: float = 600) -> Iterator[str]:
    """Start a local Ray cluster, the training worker and the replicas (autoscaled between the bounds when either
    is given); yield the URL once every replica is ready; shut everything down after."""
    autoscaling = min_replicas is not None or max_replicas is not None
    lowest = min_replicas if min_replicas is not None else 1
    highest = max_replicas if max_replicas is not None else max(replicas, lowest)  # = replicas without autoscaling
    if replicas < 1 or not 1 <= lowest <= highest:
        raise ValueError(f"need 1 <= replicas and 1 <= min_replicas <= max_replicas, "
                         f"not {replicas}, {min_replicas}, {max_replicas}")
    cores = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cores, include_dashboard=False, object_store_memory=100 * 1024**2,
             configure_logging=False)
    if threading.current_thread() is threading.main_thread():  # ray.init's handler aborts, skipping the cleanup
        signal.signal(signal.SIGTERM, _exit)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        worker = TrainingWorker.options(num_cpus=0, max_restarts=-1).remote(settings, cores)
        scaling: dict[str, Any] = (
            {"autoscaling_config": {"min_replicas": lowest, "max_replicas": highest,
                                    "initial_replicas": min(max(replicas, lowest), highest),
                                    "target_ongoing_requests": settings.max_batch_size}}
            if autoscaling else {"num_replicas": replicas})
        replica = serve.deployment(VeilReplica, name=APP_NAME).options(
            **scaling, max_ongoing_requests=2 * settings.max_batch_size,
            ray_actor_options={"num_cpus": cores / highest})
        serve.run(replica.bind(settings, worker, threads_per_replica(highest)), name=APP_NAME, route_prefix="/",
                  blocking=False)
        url = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
        wait_ready(url, startup_timeout)
        yield url
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _exit(signum: int, frame: object) -> None:
    sys.exit(0)


def wait_ready(url: str, timeout: float) -> None:
    """Until /readyz answers 200 through Ray's proxy (the replicas' model and the training worker are up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=15).is_success:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the deployment at {url} was not ready within {timeout:g} s")
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server(timeout: float = 30) -> Iterator[str]:
    """A private redis-server on a free loopback port, without persistence (rate-limit counters are ephemeral);
    yields its URI and stops it after."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("replicas share rate limits through Redis: install redis-server "
                                "(apt-get install redis-server) or set VEIL_RATE_LIMIT_STORAGE=redis://HOST:PORT")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL)
    uri = f"redis://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                redis.Redis.from_url(uri).ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.1)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)


def serve_replicas(settings: ServerSettings, replicas: int, min_replicas: int | None = None,
                   max_replicas: int | None = None) -> None:
    """What `veil serve --replicas` runs: Redis for the shared rate limit unless one is configured, the deployment,
    then wait for Ctrl-C or SIGTERM and take it all down."""
    with ExitStack() as stack:
        if settings.rate_limit_storage.startswith("memory://") and max(replicas, max_replicas or 0) > 1:
            uri = stack.enter_context(redis_server())
            settings = settings.model_copy(update={"rate_limit_storage": uri})
        url = stack.enter_context(deployment(settings, replicas, min_replicas=min_replicas,
                                             max_replicas=max_replicas))
        print(f"veil: serving on {url} (Ray Serve, rate limits in {settings.rate_limit_storage}); Ctrl-C stops",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("veil: stopping", flush=True)

