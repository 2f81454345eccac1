"""Prometheus metrics for one app (its own registry, so tests and several apps in a process stay apart).

Nothing here records a payload, a prompt or a generated text: only counts, sizes, timings and the mechanism
settings clients chose.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from client_sdk.mechanism import MechanismParams

CONTENT_TYPE = CONTENT_TYPE_LATEST
MU_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
"""The `mu` label's values: a request counts under the smallest bound at or above its mu ("+Inf" past the last).
The client chooses mu, so the label is bucketed: clients cannot create label values (time series) at will."""


def mu_bucket(mu: float) -> str:
    return next((f"{bound:g}" for bound in MU_BUCKETS if mu <= bound), "+Inf")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("veil_http_requests", "HTTP requests by route template and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("veil_http_request_seconds", "time to the response's first byte, by route",
                                 ["route"], registry=self.registry)
        self.payload_bytes = Counter("veil_payload_bytes", "bytes of privatized payloads received",
                                     registry=self.registry)
        self.prompt_tokens = Counter("veil_prompt_tokens", "privatized prompt tokens received", registry=self.registry)
        self.completion_tokens = Counter("veil_completion_tokens", "tokens generated", registry=self.registry)
        self.private_requests = Counter("veil_private_requests", "generate requests by the client's mechanism settings (mu: the bucket's upper bound)",
                                        ["bits", "dim", "mu"], registry=self.registry)

    def received(self, payload_bytes: int, prompt_tokens: int, params: MechanismParams) -> None:
        """A payload was accepted: its size, its tokens and the mechanism settings (mu bucketed, see MU_BUCKETS)."""
        self.payload_bytes.inc(payload_bytes)
        self.prompt_tokens.inc(prompt_tokens)
        self.private_requests.labels(bits=str(params.bits), dim=str(params.dim), mu=mu_bucket(params.mu_clt)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
