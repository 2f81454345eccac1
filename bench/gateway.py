"""The gateway's added latency: an OpenAI-format request through `veil gateway` against the same request through the
SDK directly (AsyncPrivateLLMClient), time to first token and total, one run.

    veil bench gateway [--pairs 60] [--max-new-tokens 4] [--url URL]

Starts `veil serve` on the default model (or uses --url) and `veil gateway` in front of it, each its own process as
deployed, and sends the same prompt (the whole message private, fresh noise each time, a ledger each) alternately
through both, in pairs whose order alternates. Both paths privatize with the same SDK, so a pair's difference is
what the gateway adds: the extra loopback hop, OpenAI's JSON and SSE, the conversation's spans and the page's
record. TTFT is the time to the first streamed text; total is a whole non-streamed answer. Reports the median of
each path and the median (bootstrap SE) and mean (SE) of the paired differences; the target is on the median, as the
server's time on a shared machine varies by more than the gateway adds. Also times the gateway's own steps in
process (no HTTP, no SDK), which no scheduling noise touches. Writes bench/results/gateway.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
from httpx_sse import EventSource

from app.cli import local_server, wait_until_ready
from bench.bootstrap import resample_indices
from client_sdk import AsyncPrivateLLMClient

RESULTS = Path(__file__).parent / "results"
PROMPT = "What is the capital of France?"
TARGET_MS = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_gateway(server: str, ledger: Path) -> Iterator[str]:
    """`veil gateway` in a subprocess in front of `server`; yields its URL once it answers."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "gateway", "--server", server, "--port", str(port),
                                "--ledger", str(ledger)], env=os.environ.copy(), stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, f"{url}/v1/models", "gateway", 60)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


async def sdk_times(sdk: AsyncPrivateLLMClient, max_new_tokens: int) -> tuple[float, float]:
    """(TTFT of a stream, total of a single answer) in seconds, through the SDK directly."""
    start = time.perf_counter()
    stream = await sdk.generate(PROMPT, max_new_tokens=max_new_tokens, stream=True)
    first = None
    async for piece in stream:
        if piece and first is None:
            first = time.perf_counter() - start
    start = time.perf_counter()
    await sdk.generate(PROMPT, max_new_tokens=max_new_tokens)
    return first, time.perf_counter() - start


async def gateway_times(http: httpx.AsyncClient, max_new_tokens: int) -> tuple[float, float]:
    """The same two measurements through the gateway, as an OpenAI client's HTTP requests."""
    body = {"model": "veil", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_new_tokens,
            "temperature": 0}
    start = time.perf_counter()
    first = None
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for sse in EventSource(response).aiter_sse():
            if first is None and sse.data != "[DONE]" and json.loads(sse.data)["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    start = time.perf_counter()
    (await http.post("/v1/chat/completions", json=body)).raise_for_status()
    return first, time.perf_counter() - start


async def measure(server: str, gateway: str, ledger: Path, pairs: int, max_new_tokens: int) -> dict[str, list]:
    times: dict[str, list] = {"sdk": [], "gateway": []}
    async with AsyncPrivateLLMClient(server, ledger=ledger) as sdk, \
            httpx.AsyncClient(base_url=gateway, timeout=300) as http:
        for _ in range(3):  # warm up both paths (bundle, connections, caches)
            await sdk_times(sdk, max_new_tokens)
            await gateway_times(http, max_new_tokens)
        for i in range(pairs):
            order = [("sdk", lambda: sdk_times(sdk, max_new_tokens)),
                     ("gateway", lambda: gateway_times(http, max_new_tokens))]
            for name, run in order if i % 2 == 0 else reversed(order):
                times[name].append(await run())
    return times


def own_work_ms(repeats: int = 2000) -> float:
    """The median CPU time of the gateway's own steps for one chat request, in process (no HTTP, no SDK): parsing
    and checking the request, the mode's messages, the conversation's map, the page's record, the privacy report
    and headers, the answer's JSON. The hop's HTTP handling is what the paired timings add on top."""
    from client_sdk.accounting import privacy_report
    from client_sdk.gateway import openai_api
    from client_sdk.gateway.app import _display, veil_headers, veil_report
    from client_sdk.gateway.modes import Conversations, to_messages
    from client_sdk.policy import reference_mechanism

    body = json.loads(json.dumps({"model": "veil", "messages": [{"role": "user", "content": PROMPT}],
                                  "max_tokens": 4, "temperature": 0}))
    privacy, conversations, times = privacy_report(reference_mechanism(), 7, public_tokens=5), Conversations(), []
    for _ in range(repeats):
        start = time.perf_counter()
        req = openai_api.parse_request(body, openai_api.ChatCompletionRequest)
        pairs = req.conversation()
        messages = to_messages(pairs, "whole")
        _display(messages, conversations.get("gateway", pairs))
        report = veil_report(privacy, "whole", "gateway", 0)
        veil_headers(report)
        json.dumps(openai_api.CHAT.completion(openai_api.CHAT.completion_id(), "m", "Paris.", "stop",
                                              openai_api.usage(12, 4), report))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def summarize(times: dict[str, list]) -> list[dict]:
    """Per metric: each path's median, and the paired differences' mean (SE) and median (bootstrap SE): on a shared
    machine the server's time varies by more than the gateway adds, and the median is robust to its outliers."""
    rows = []
    for index, metric in enumerate(("ttft", "total")):
        sdk = np.array([t[index] for t in times["sdk"]]) * 1e3
        gw = np.array([t[index] for t in times["gateway"]]) * 1e3
        added = gw - sdk
        medians = np.median(added[resample_indices(len(added))], axis=1)
        rows.append({"metric": metric, "sdk_median_ms": float(np.median(sdk)),
                     "gateway_median_ms": float(np.median(gw)), "added_mean_ms": float(added.mean()),
                     "added_se_ms": float(added.std(ddof=1) / np.sqrt(len(added))),
                     "added_median_ms": float(np.median(added)), "added_median_se_ms": float(medians.std(ddof=1)),
                     "pairs": len(added)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| metric | SDK directly (median ms) | through the gateway (median ms) | added: median +- SE (ms) | "
             "added: mean +- SE (ms) | pairs |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['sdk_median_ms']:.1f} | {r['gateway_median_ms']:.1f} | "
                     f"{r['added_median_ms']:.2f} +- {r['added_median_se_ms']:.2f} | "
                     f"{r['added_mean_ms']:.2f} +- {r['added_se_ms']:.2f} | {r['pairs']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--url", help="a running veil server (default: start `veil serve` on the default model)")
    parser.add_argument("--port", type=int, default=8767, help="the port of the server this starts")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        with (local_server(args.port) if args.url is None else nullcontext(args.url)) as server, \
                local_gateway(server, Path(tmp) / "gateway-ledger.db") as gateway:
            times = asyncio.run(measure(server, gateway, Path(tmp) / "sdk-ledger.db", args.pairs,
                                        args.max_new_tokens))
    rows = summarize(times)
    own = own_work_ms()
    command = f"veil bench gateway --pairs {args.pairs} --max-new-tokens {args.max_new_tokens}"
    text = table(rows)
    print(text)
    print(f"the gateway's own steps, in process: {own:.3f} ms per request (median)")
    verdict = all(r["added_median_ms"] <= TARGET_MS for r in rows)
    print(f"target: <= {TARGET_MS:g} ms added per request (median): {'met' if verdict else 'NOT met'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "server": "default model" if args.url is None else args.url, "prompt": PROMPT,
              "target_ms": TARGET_MS, "target_met": verdict, "rows": rows, "own_work_ms": own,
              "load_average": [load_before, os.getloadavg()[0]], "cpus": os.cpu_count()}
    (RESULTS / "gateway.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "gateway.md").write_text(
        f"# Gateway overhead\n\n`{command}` ({os.cpu_count()} CPUs at load {load_before:.1f}, one run; the same "
        f"prompt through the SDK directly and through `veil gateway`, paired)\n\n{text}\n\nThe gateway's own steps "
        f"(parsing, the mode's messages, the conversation's map, the page's record, the report, the answer's JSON), "
        f"in process: {own:.3f} ms per request (median).\n\nTarget: <= {TARGET_MS:g} ms added per request (the "
        f"median of the paired differences): {'met' if verdict else 'not met'}.\n")

if __name__ == "__main__":
    main()
