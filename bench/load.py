"""Load on a running server: throughput and latency of concurrent private requests, and what batching buys.

    veil bench load [--url URL] [--clients 8 32] [--seconds 30] [--max-new-tokens 16]

Without --url it starts `veil serve` (the default model) on loopback. Every client loops over privatized payloads
of prompts of different lengths (prepared once by the SDK: the client's work is not what is measured) and posts
them to /v1/generate for the given seconds. One client first, as the one-at-a-time baseline, then each concurrency.
Prints a table (requests/s, tokens/s, p50/p95/p99 latency, errors, speed-up over one client) and writes
bench/results/load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np

from app.cli import local_server
from client_sdk.client import PrivateLLMClient

RESULTS = Path(__file__).parent / "results" / "load.json"
PROMPTS = ["What is the capital of France?", "Tell me a short story about a lighthouse keeper and the sea.",
           "Summarise the plot of Pride and Prejudice in two sentences, please.", "Hello!",
           "List three uses of a paperclip.", "Why is the sky blue? Explain it simply to a child of seven."]


def payloads(url: str) -> list[bytes]:
    """One privatized payload per prompt, made by the SDK as an app would (server's default mechanism)."""
    with PrivateLLMClient(url) as client:
        return [client.prepare(prompt).payload for prompt in PROMPTS]


async def run_load(url: str, bodies: list[bytes], clients: int, seconds: float, max_new_tokens: int,
                   headers: dict[str, str] | None = None) -> dict:
    """`clients` concurrent loops posting `bodies` for `seconds`; latency percentiles, throughput and errors."""
    latencies: list[float] = []
    tokens, errors = 0, []
    stop_at = time.monotonic() + seconds

    async def client_loop(index: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        turn = index
        while time.monotonic() < stop_at:
            body = bodies[turn % len(bodies)]
            turn += 1
            start = time.monotonic()
            try:
                response = await http.post("/v1/generate", params={"max_new_tokens": max_new_tokens}, content=body,
                                           headers={"content-type": "application/octet-stream", **(headers or {})})
            except httpx.HTTPError as err:
                errors.append(type(err).__name__)
                continue
            if response.status_code != 200:
                errors.append(str(response.status_code))
                continue
            latencies.append(time.monotonic() - start)
            tokens += response.json()["completion_tokens"]

    started = time.monotonic()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(*(client_loop(i, http) for i in range(clients)))
    elapsed = time.monotonic() - started
    p50, p95, p99 = (np.percentile(latencies, [50, 95, 99]).tolist() if latencies else [float("nan")] * 3)
    return {"clients": clients, "seconds": elapsed, "requests": len(latencies), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "requests_per_second": len(latencies) / elapsed,
            "tokens_per_second": tokens / elapsed, "p50": p50, "p95": p95, "p99": p99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start `veil serve` on loopback)")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()

    def measure(url: str) -> list[dict]:
        bodies = payloads(url)
        return [asyncio.run(run_load(url, bodies, clients, args.seconds, args.max_new_tokens))
                for clients in [1, *args.clients]]

    if args.url:
        rows = measure(args.url)
    else:
        with local_server(args.port) as url:
            rows = measure(url)
    base = rows[0]["tokens_per_second"]
    print(f"\n{args.seconds:g} s per row, {args.max_new_tokens} new tokens per request, {len(PROMPTS)} prompts\n")
    print("| clients | requests/s | tokens/s | vs 1 client | p50 s | p95 s | p99 s | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['clients']} | {row['requests_per_second']:.2f} | {row['tokens_per_second']:.1f} | "
              f"{row['tokens_per_second'] / base:.2f}x | {row['p50']:.2f} | {row['p95']:.2f} | {row['p99']:.2f} | "
              f"{row['errors']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {**vars(args), "out": str(args.out)}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
