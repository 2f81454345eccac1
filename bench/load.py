"""Load on a running server: throughput and latency of concurrent private requests, per backend, and what batching
buys; and overload, beyond what the server queues.

    veil bench load [--url URL] [--clients 8 32] [--seconds 30] [--max-new-tokens 16]
                    [--backends transformers llamacpp] [--threads N]
    veil bench load --overload [--queue 8] [--seconds 30]

Without --url it starts `veil serve` (the default model) on loopback, one server per backend of --backends (both
up at once, measured in turn: each row of clients runs on every backend before the next, so that they see about
the same machine load). Every client loops over privatized payloads of prompts of different lengths (8 per prompt,
fresh noise each, prepared once by the SDK: the client's work is not what is measured) and posts them to
/v1/generate for the given seconds; after a 503 it waits the Retry-After the server sent. One client first, as the
one-at-a-time baseline, then each concurrency. Prints a table (requests/s, tokens/s, p50/p95/p99 latency, errors,
speed-up over one client, and over the first backend at the same concurrency) and writes bench/results/load.json.
With --url: that server alone.

--overload starts the server with VEIL_MAX_QUEUE=--queue (with --url: says what the server was started with) and
runs 4 x that many clients; it counts every status code (the server must answer each with 200 or 503), then
sends one request the moment the flood ends, to see that the server recovers at once. Writes
bench/results/load-overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from contextlib import ExitStack, nullcontext
from pathlib import Path

import httpx
import numpy as np

from app.cli import local_server
from client_sdk.client import PrivateLLMClient

RESULTS = Path(__file__).parent / "results" / "load.json"
OVERLOAD_RESULTS = Path(__file__).parent / "results" / "load-overload.json"
PROMPTS = ["What is the capital of France?", "Tell me a short story about a lighthouse keeper and the sea.",
           "Summarise the plot of Pride and Prejudice in two sentences, please.", "Hello!",
           "List three uses of a paperclip.", "Why is the sky blue? Explain it simply to a child of seven."]


def payloads(url: str, each: int = 8) -> list[bytes]:
    """`each` privatized payloads per prompt (fresh noise each, as clients send: the llama.cpp backend reuses the
    keys of leading rows a prompt shares with recent ones, which a replayed payload would share entirely), made by
    the SDK as an app would (server's default mechanism), the prompts interleaved."""
    with PrivateLLMClient(url) as client:
        return [client.prepare(prompt).payload for _ in range(each) for prompt in PROMPTS]


async def run_load(url: str, bodies: list[bytes], clients: int, seconds: float, max_new_tokens: int,
                   headers: dict[str, str] | None = None) -> dict:
    """`clients` concurrent loops posting `bodies` for `seconds`; latency percentiles, throughput and errors."""
    latencies: list[float] = []
    tokens, errors, statuses = 0, [], Counter()
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
                statuses[type(err).__name__] += 1
                continue
            statuses[str(response.status_code)] += 1
            if response.status_code == 503 and "retry-after" in response.headers:
                await asyncio.sleep(min(float(response.headers["retry-after"]), stop_at - time.monotonic()))
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
            "error_kinds": sorted(set(errors)), "statuses": dict(statuses),
            "requests_per_second": len(latencies) / elapsed,
            "tokens_per_second": tokens / elapsed, "p50": p50, "p95": p95, "p99": p99}


def overload(url: str, bodies: list[bytes], queue: int, seconds: float, max_new_tokens: int) -> dict:
    """A one-client baseline, then 4 x `queue` clients, then one request the moment they stop."""
    baseline = asyncio.run(run_load(url, bodies, 1, min(seconds, 10), max_new_tokens))
    flood = asyncio.run(run_load(url, bodies, 4 * queue, seconds, max_new_tokens))
    start = time.monotonic()
    after = httpx.post(f"{url}/v1/generate", params={"max_new_tokens": max_new_tokens}, content=bodies[0],
                       headers={"content-type": "application/octet-stream"}, timeout=600)
    return {"queue": queue, "baseline": baseline, "flood": flood,
            "answered_200_or_503_only": set(flood["statuses"]) <= {"200", "503"},
            "after": {"status": after.status_code, "seconds": time.monotonic() - start}}


def print_overload(result: dict, max_new_tokens: int) -> None:
    flood, after = result["flood"], result["after"]
    print(f"\n{flood['clients']} clients (4 x VEIL_MAX_QUEUE={result['queue']}) for {flood['seconds']:.0f} s, "
          f"{max_new_tokens} new tokens per request; clients wait Retry-After after a 503\n")
    print("| statuses | 200/s | p50 s (200) | p99 s (200) | only 200 or 503 | next request | its latency | "
          "1 client's p50 |")
    print("|---|---|---|---|---|---|---|---|")
    statuses = ", ".join(f"{code}: {count}" for code, count in sorted(flood["statuses"].items()))
    print(f"| {statuses} | {flood['requests_per_second']:.2f} | {flood['p50']:.2f} | {flood['p99']:.2f} | "
          f"{result['answered_200_or_503_only']} | {after['status']} | {after['seconds']:.2f} s | "
          f"{result['baseline']['p50']:.2f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start `veil serve` on loopback)")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--backends", nargs="+", default=["transformers", "llamacpp"],
                        choices=["transformers", "llamacpp", "vllm"],
                        help="one server each (without --url); the first is the baseline of the comparison")
    parser.add_argument("--threads", type=int, help="VEIL_THREADS of the servers (llama.cpp's threads)")
    parser.add_argument("--overload", action="store_true", help="4 x the queue's capacity of clients")
    parser.add_argument("--queue", type=int, default=8, help="VEIL_MAX_QUEUE of the server (--overload)")
    parser.add_argument("--out", type=Path, help="where the JSON goes (default: bench/results/load*.json)")
    args = parser.parse_args()
    out = args.out or (OVERLOAD_RESULTS if args.overload else RESULTS)
    record: dict = {"args": {**vars(args), "out": str(out)}}
    if args.overload:
        env = {"VEIL_MAX_QUEUE": str(args.queue)}
        with nullcontext(args.url) if args.url else local_server(args.port, env) as url:
            measured = overload(url, payloads(url), args.queue, args.seconds, args.max_new_tokens)
        print_overload(measured, args.max_new_tokens)
        record.update(measured)
    else:
        threads = {"VEIL_THREADS": str(args.threads)} if args.threads else {}
        with ExitStack() as stack:
            urls = {"server": args.url} if args.url else {
                name: stack.enter_context(local_server(args.port + i, {"VEIL_BACKEND": name, **threads}))
                for i, name in enumerate(args.backends)}
            bodies = payloads(next(iter(urls.values())))  # the servers serve the same bundle
            rows: dict[str, list[dict]] = {name: [] for name in urls}
            for clients in [1, *args.clients]:
                for name, url in urls.items():
                    rows[name].append(asyncio.run(run_load(url, bodies, clients, args.seconds, args.max_new_tokens)))
        print_rows(rows, args)
        record["backends"] = rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


def print_rows(rows: dict[str, list[dict]], args: argparse.Namespace) -> None:
    first = next(iter(rows))
    print(f"\n{args.seconds:g} s per row, {args.max_new_tokens} new tokens per request, {len(PROMPTS)} prompts\n")
    print(f"| backend | clients | requests/s | tokens/s | vs 1 client | vs {first} | p50 s | p95 s | p99 s | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, backend_rows in rows.items():
        for row, base in zip(backend_rows, rows[first]):
            print(f"| {name} | {row['clients']} | {row['requests_per_second']:.2f} | {row['tokens_per_second']:.1f} | "
                  f"{row['tokens_per_second'] / backend_rows[0]['tokens_per_second']:.2f}x | "
                  f"{row['tokens_per_second'] / base['tokens_per_second']:.2f}x | {row['p50']:.2f} | "
                  f"{row['p95']:.2f} | {row['p99']:.2f} | {row['errors']} |")

if __name__ == "__main__":
    main()
