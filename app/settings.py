"""Server settings, from VEIL_* environment variables or a .env file (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "smollm2"


class ServerSettings(BaseSettings):
    """Everything `veil serve` can be told; each field is also VEIL_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="VEIL_", env_file=".env", extra="ignore")

    model: str = DEFAULT_MODEL
    """'smollm2' (the bundled SmolLM2-135M-Instruct GGUF), a Hugging Face model id, or a local directory."""
    cache_dir: Path = Path.home() / ".cache" / "veil"
    soft_prompt_dir: Path = REPO_ROOT / "soft_prompts"
    projection_dir: Path = REPO_ROOT / "projections"
    serve_below_floor: bool = False
    """Serve active soft prompts whose held-out check found them worse than sending nothing (an explicit opt-in)."""
    data_dir: Path = REPO_ROOT.parent / "shared" / "data"
    """Named training corpora (WikiText-2, Austen) live here; see app.training.data.CORPORA."""
    device: str = "cpu"

    projection_dim: int = 72
    """k of the PCA projection served when no trained one is active (b/8 for SmolLM2's b = 576)."""
    clip: float = 2.0
    """c of the PCA projection: its coordinates are whitened, so c is in standard deviations."""
    default_bits: int = 4
    default_mu: float = 4.0  # the SDK's default operating point (client_sdk.policy.REFERENCE_MU; docs/BENCHMARKS.md)

    admin_key: SecretStr | None = None
    """The admin API's bearer key (separate from client keys); the admin API is off without one."""
    max_upload_bytes: int = 64 * 1024 * 1024
    max_batch_size: int = 8
    """Generate requests that arrive while the model is busy run together, up to this many at once."""
    batch_window_ms: float = 5.0
    """How long the batcher waits for more requests after the first one."""
    backend: Literal["transformers", "llamacpp", "vllm"] | None = None
    """What generates: llama.cpp on the model's GGUF (llamacpp, CPU), the model in this process (transformers) or
    vLLM's in-process engine (vllm, GPU). Unset: llamacpp when llama-cpp-python is installed, the device is the CPU
    and the model is a GGUF; transformers otherwise."""
    threads: int | None = None
    """CPU threads the model runs on (llama.cpp's threads, or torch's for the transformers backend); unset: every
    CPU this process may use. On a machine shared with other busy processes fewer threads than CPUs can be much
    faster (llama.cpp's threads wait for each other by spinning)."""
    max_queue: int = 64
    """Generate requests that may wait for the model (beyond the running batch); more get 503 with Retry-After."""
    generation_deadline_s: float = 120.0
    """A generate request still unanswered this long after it was queued is stopped: 503 deadline_exceeded."""
    require_api_key: bool = False
    """Whether /v1 routes need `Authorization: Bearer <client key>` (keys: `veil keys create`)."""
    rate_limit_per_minute: int = 600
    """Requests a minute per client key (per client address when keys are not required); over it: 429."""
    rate_limit_storage: str = "memory://"
    """Where rate-limit counters live (a `limits` storage URI): "memory://" per process, or a shared store such as
    "redis://host:6379" so that replicas count together."""
    auth_failures_per_minute: int = 10
    """Failed authentications (client or admin key) a minute per client address; past it, 429 before any key is
    checked or any audit line written."""
    trusted_proxies: str = ""
    """Comma-separated addresses (or networks) of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are
    believed; by default none, so the client address is the TCP peer's."""
    body_timeout_s: float = 30.0
    """The longest a request body may take to arrive, in all (a slow sender gets 408)."""
    max_admin_json_bytes: int = 1024 * 1024
    """Largest JSON body an admin route accepts (uploads have max_upload_bytes)."""
    audit_log_max_bytes: int = 16 * 1024 * 1024
    """audit.log is rotated to audit.log.1 (the one older file kept) when it would grow past this."""
    docs: bool = False
    """Serve /docs, /redoc and /openapi.json (they list every route, admin ones included)."""
    uvicorn_access_log: bool = False
    """Also print uvicorn's own access log (it includes query strings, which carry user text such as stop strings)."""
    tenant_training_epsilon: float = 10.0
    """Training epsilon a tenant's data may take in all (DP soft prompts) unless the admin API sets another."""

    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512
    host: str = "127.0.0.1"
    port: int = 8000
