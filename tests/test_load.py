"""The load test, short, on loopback with the tiny model: 32 concurrent clients, zero errors, latency reported."""

from __future__ import annotations

import asyncio
import math

import pytest

from bench.load import run_load
from client_sdk import PrivateLLMClient


@pytest.fixture
def settings(settings):
    """No rate limit: 32 clients on one address would pass the default 600 a minute in 3 s on a fast machine."""
    return settings.model_copy(update={"rate_limit_per_minute": 1_000_000})


def test_32_concurrent_clients_get_answers_without_errors(loopback, client_cache) -> None:
    with PrivateLLMClient(loopback.url, cache_dir=client_cache) as client:
        bodies = [client.prepare(text).payload for text in ("hello world", "the capital of france is paris .",
                                                            "what is the river ?")]
    result = asyncio.run(run_load(loopback.url, bodies, clients=32, seconds=3, max_new_tokens=4))
    assert result["errors"] == 0, result["error_kinds"]
    assert result["requests"] >= 32 and result["tokens_per_second"] > 0
    assert all(math.isfinite(result[p]) for p in ("p50", "p95", "p99"))
    # the load generator's counts agree with the server's own (an independent count of the same requests)
    served = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for m in loopback.server.config.app.state.metrics.registry.collect() for s in m.samples}
    assert served[("veil_http_requests_total", (("route", "/v1/generate"), ("status", "200")))] == result["requests"]
    assert served[("veil_completion_tokens_total", ())] == round(result["tokens_per_second"] * result["seconds"])
