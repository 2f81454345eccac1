"""The load test, short, on loopback with the tiny model: 32 concurrent clients, zero errors, latency reported."""

from __future__ import annotations

import asyncio
import math

from bench.load import run_load
from client_sdk import PrivateLLMClient


def test_32_concurrent_clients_get_answers_without_errors(loopback, client_cache) -> None:
    with PrivateLLMClient(loopback.url, cache_dir=client_cache) as client:
        bodies = [client.prepare(text).payload for text in ("hello world", "the capital of france is paris .",
                                                            "what is the river ?")]
    result = asyncio.run(run_load(loopback.url, bodies, clients=32, seconds=3, max_new_tokens=4))
    assert result["errors"] == 0, result["error_kinds"]
    assert result["requests"] >= 32 and result["tokens_per_second"] > 0
    assert all(math.isfinite(result[p]) for p in ("p50", "p95", "p99")) and result["p50"] <= result["p99"]
