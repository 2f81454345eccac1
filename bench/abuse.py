"""Red team: replay issue 15's attacks against `veil serve` on loopback and check what the server does, and issue
24's against the SDK (bench.abuse_device: a fake server on 127.0.0.1 serving doctored bundles, templates, tables,
event streams and redirects; rows with owner "device", in a table of their own).

    veil bench abuse [--model smollm2|tiny] [--port 8790]

Starts two servers (tiny model: a random 2-layer Llama saved to a temporary directory; default: SmolLM2):
A with the admin API and client keys (tenants acme and globex), B with neither (keys off, admin off, 20 requests
a minute). Each attack is a row: what we expect, what we observed, pass or fail. Prints the table and writes
bench/results/abuse.json, and the markdown table SECURITY.md carries to bench/results/abuse.md. Rows marked
"generation" test fixes made outside the server hardening work (stop strings, cancellation, the bounded queue).
They need the default model: the tiny one finishes a generation before it can be observed. The CPU figures are the server process's own (from /proc), so
other load on the machine slows the server but does not count against it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import httpx
import numpy as np

from app.artifacts import SERVER_ONLY
from app.cli import wait_until_ready
from app.keys import KeyStore
from app.metrics import MU_BUCKETS
from bench.abuse_device import against_device
from client_sdk import wire
from client_sdk.mechanism import MechanismParams

RESULTS = Path(__file__).parent / "results" / "abuse.json"
TABLE = RESULTS.with_suffix(".md")
ADMIN = {"Authorization": "Bearer red-team-admin"}
BINARY = {"content-type": "application/octet-stream"}
BODY_TIMEOUT_S = 5
ROWS: list[dict] = []


def row(attack: str, expected: str, observed: str, passed: bool, owner: str = "server") -> None:
    ROWS.append({"attack": attack, "expected": expected, "observed": observed, "pass": bool(passed), "owner": owner})
    print(f"  {'PASS' if passed else 'FAIL'}  {attack}: {observed}", flush=True)


def attack(name: str, expected: str, owner: str = "server") -> Callable:
    """Run the decorated function now; it returns (observed, passed). An exception is a failed row."""
    def run(check: Callable[[], tuple[str, bool]]) -> None:
        try:
            observed, passed = check()
        except Exception as err:  # a crashed attack is reported, never hides the others
            observed, passed = f"{type(err).__name__}: {err}"[:200], False
        row(name, expected, observed, passed, owner)
    return run


class Served:
    """`veil serve` in a subprocess with its stdout kept (for the access log) and its pid (for memory and CPU)."""

    def __init__(self, port: int, env: dict[str, str], log: Path) -> None:
        self.url, self.log = f"http://127.0.0.1:{port}", log
        self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                                        env={**os.environ, **env}, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        try:
            wait_until_ready(self.process, f"{self.url}/readyz", "server", 300)
        except RuntimeError as err:
            raise RuntimeError(f"{err}: {log.read_text()[-2000:]}") from None

    def status(self, field: str) -> int:
        """A /proc/<pid>/status figure in KiB (VmHWM: the peak resident memory so far)."""
        line = next(l for l in Path(f"/proc/{self.process.pid}/status").read_text().splitlines() if l.startswith(field))
        return int(line.split()[1])

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # stuck in a generation that does not stop
            self.process.kill()
            self.process.wait()


@contextmanager
def served(port: int, env: dict[str, str], log: Path) -> Iterator[Served]:
    server = Served(port, env, log)
    try:
        yield server
    finally:
        server.stop()


def tiny_model(directory: Path) -> str:
    from tests.conftest import tiny_runner

    runner = tiny_runner()
    runner.model.save_pretrained(directory)
    runner.tokenizer.save_pretrained(directory)
    return str(directory)


def payload(bundle: dict, mu: float, tokens: int = 8, projection_id: str | None = None) -> bytes:
    """A well-formed payload of random levels (what is in it does not matter to these attacks)."""
    pid = projection_id or bundle["defaults"]["projection_id"]
    info = next(p for p in bundle["projections"] if p["id"] == pid)
    bits = bundle["defaults"]["bits"]
    params = MechanismParams.from_mu(mu, bits=bits, dim=info["dim"], clip=info["clip"])
    levels = np.random.default_rng(0).integers(0, 2**bits, (tokens, info["dim"]), dtype=np.uint8)
    return wire.encode(wire.Payload(params, pid, levels))


def raw_status(port: int, head: bytes, pieces: list[bytes], gap: float, wait: float) -> tuple[str, float]:
    """Send a head, then body pieces `gap` s apart; the status line that came back (or "") and after how long."""
    start, answer = time.monotonic(), b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        for piece in pieces:
            try:
                sock.sendall(piece)
                sock.settimeout(gap)
                answer += sock.recv(65536)
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                break
            if answer or time.monotonic() - start > wait:
                break
        sock.settimeout(max(0.1, wait - (time.monotonic() - start)))
        try:
            while b"\r\n" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
        except (socket.timeout, OSError):
            pass
    return answer.split(b"\r\n")[0].decode(errors="replace"), time.monotonic() - start


def wait_job(http: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while (job := http.get(f"/admin/jobs/{job_id}", headers=ADMIN).json())["state"] in ("queued", "running"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['state']}")
        time.sleep(0.2)
    return job


def idle_cpu(server: Served, after: float, window: float = 2.0) -> float:
    """The server's CPU use (cores) over `window` s, starting `after` s from now."""
    time.sleep(after)
    start = server.cpu_seconds()
    time.sleep(window)
    return (server.cpu_seconds() - start) / window


def settle(server: Served, timeout: float = 180) -> None:
    """Wait until the server is idle (under 0.2 core over a second), so one attack's leftovers do not count
    against the next; say so when it does not settle."""
    deadline = time.monotonic() + timeout
    while (cores := idle_cpu(server, after=0, window=1)) >= 0.2:
        if time.monotonic() > deadline:
            print(f"  (the server is still busy: {cores:.2f} cores after {timeout:.0f} s)", flush=True)
            return


def corpus(sentences: int = 3000) -> str:
    rng = np.random.default_rng(1)
    words = "the capital of france is paris a city and river hello world what".split()
    return "\n".join(" ".join(rng.choice(words, 12)) + " ." for _ in range(sentences))


def against_a(a: Served, cache: Path, keys: dict) -> None:
    """Server A: admin API on, client keys required (tenants acme and globex)."""
    http = httpx.Client(base_url=a.url, timeout=120)
    bundle = http.get("/v1/bundle", headers=keys["plain"]).json()
    port = int(a.url.rsplit(":", 1)[1])

    @attack("slow body: chunked, 1 byte every 0.5 s", f"408 within {BODY_TIMEOUT_S} s (+1)")
    def _():
        head = (f"POST /v1/generate HTTP/1.1\r\nHost: x\r\n{keys['plain_header']}\r\n"
                "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        status, seconds = raw_status(port, head, [b"1\r\nx\r\n"] * 60, gap=0.5, wait=BODY_TIMEOUT_S + 10)
        return f"{status or 'no answer'} after {seconds:.1f} s", " 408 " in status and seconds <= BODY_TIMEOUT_S + 1

    @attack("JSONL line nested 100k levels", "422 JSON")
    def _():
        deep = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
        r = http.post("/admin/uploads", content=deep, headers={**ADMIN, "content-type": "application/jsonl"})
        return f"{r.status_code} {r.headers.get('content-type')}", r.status_code == 422 and r.json()["error"]

    @attack("60 MB JSONL upload while /healthz is polled", "/healthz answers within 1 s throughout")
    def _():
        line = json.dumps({"text": "the capital of france is paris . " * 30}).encode() + b"\n"
        big = line * (60_000_000 // len(line))
        latencies, done = [], threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=a.url, timeout=60) as prober:
                while not done.is_set():
                    start = time.monotonic()
                    prober.get("/healthz")
                    latencies.append(time.monotonic() - start)
                    time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        r = http.post("/admin/uploads", content=big, headers={**ADMIN, "content-type": "application/jsonl"})
        done.set()
        prober.join()
        worst = max(latencies)
        return (f"upload {r.status_code} ({len(big) / 1e6:.0f} MB); /healthz worst {worst:.2f} s over "
                f"{len(latencies)} probes"), r.status_code == 201 and worst < 1.0

    @attack("/docs, /redoc, /openapi.json without a key", "404 each")
    def _():
        codes = [http.get(p).status_code for p in ("/docs", "/redoc", "/openapi.json")]
        return str(codes), codes == [404] * 3

    upload = http.post("/admin/uploads", content=corpus().encode(), headers={**ADMIN, "content-type": "TEXT/PLAIN"})
    shape = dict(prefix_tokens=8, continuation_tokens=8, batch_size=2, held_out_segments=2)
    dim = bundle["projections"][0]["dim"]

    @attack("Content-Type: TEXT/PLAIN on an upload", "201")
    def _():
        return str(upload.status_code), upload.status_code == 201

    @attack("Content-Type: APPLICATION/OCTET-STREAM on /v1/generate", "200", owner="generation")
    def _():
        r = http.post("/v1/generate", params={"max_new_tokens": 1}, content=payload(bundle, 20.0),
                      headers={**keys["plain"], "content-type": "APPLICATION/OCTET-STREAM"})
        return str(r.status_code), r.status_code == 200

    @attack("4 concurrent jobs named rt-dup", "one 202, three 409")
    def _():
        body = {"name": "rt-dup", "data": upload.json()["data"], "dim": dim, "steps": 100_000, **shape}
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: http.post("/admin/projections", json=body, headers=ADMIN), range(4)))
        codes = sorted(r.status_code for r in answers)
        for r in answers:
            if r.status_code == 202:
                http.post(f"/admin/jobs/{r.json()['id']}/cancel", headers=ADMIN)
                wait_job(http, r.json()["id"])
        return str(codes), codes == [202, 409, 409, 409]

    before = {p["id"] for p in bundle["projections"]}
    job = http.post("/admin/projections", json={"name": "rt-p", "data": upload.json()["data"], "dim": dim,
                                                "steps": 2, "activate": True, **shape}, headers=ADMIN).json()
    wait_job(http, job["id"])
    (pid,) = {p["id"] for p in http.get("/v1/bundle", headers=keys["plain"]).json()["projections"]} - before
    prompt = {"data": upload.json()["data"], "projection_id": pid, "virtual_tokens": 2, "steps": 1, "activate": True,
              "floor_data": None,  # a throwaway prompt: served without the held-out check
              "bits": bundle["defaults"]["bits"], **shape}
    wait_job(http, http.post("/admin/soft-prompts", json={**prompt, "name": "rt-uses-p", "mu": 5.0},
                             headers=ADMIN).json()["id"])

    @attack("delete a projection an active soft prompt uses", "409 naming it")
    def _():
        r = http.delete("/admin/projections/rt-p", headers=ADMIN)
        return f"{r.status_code} {r.json()['detail'][:80]}", r.status_code == 409 and "rt-uses-p" in r.text

    dp = http.post("/admin/dp-soft-prompts", json={**prompt, "name": "rt-acme-dp", "mu": 20.0, "tenant": "acme",
                                                   "target_epsilon": 5.0, "physical_batch_size": 1}, headers=ADMIN)
    if dp.status_code != 202:
        raise SystemExit(f"the DP soft-prompt job was refused: {dp.status_code} {dp.text}")
    dp_job = wait_job(http, dp.json()["id"])

    @attack("another tenant's key asks for acme's DP prompt", "acme gets rt-acme-dp, globex and keyless do not")
    def _():
        body = payload(http.get("/v1/bundle", headers=keys["plain"]).json(), 20.0, projection_id=pid)
        used = {name: http.post("/v1/generate", params={"max_new_tokens": 1}, content=body,
                                headers={**keys[name], **BINARY}).json().get("soft_prompt")
                for name in ("acme", "globex", "plain")}
        return f"{used} (DP job {dp_job['state']}{': ' + dp_job['error'] if dp_job['error'] else ''})", (used["acme"] == "rt-acme-dp"
                                                       and "rt-acme-dp" not in (used["globex"], used["plain"]))

    @attack("DP manifest as listed by the admin API", f"none of {', '.join(SERVER_ONLY)}")
    def _():
        listed = {a["name"]: a["manifest"] for a in http.get("/admin/soft-prompts", headers=ADMIN).json()}
        leaked = sorted(set(SERVER_ONLY) & listed["rt-acme-dp"].keys())
        return f"leaked: {leaked or 'nothing'}", not leaked

    @attack("mu header values 1e-3 and 1.35e5", f"mu label within {len(MU_BUCKETS) + 1} fixed values")
    def _():
        for mu in (1e-3, 1.35e5, 3.87):
            http.post("/v1/generate", params={"max_new_tokens": 1}, content=payload(bundle, mu),
                      headers={**keys["plain"], **BINARY})
        text = http.get("/metrics").text
        labels = {part.split('mu="')[1].split('"')[0] for part in text.splitlines()
                  if part.startswith("veil_private_requests_total{")}
        allowed = {f"{b:g}" for b in MU_BUCKETS} | {"+Inf"}
        return f"labels {sorted(labels)}", labels <= allowed

    @attack("non-stream request (max_new_tokens=512) from a client SIGKILLed while it runs",
            "CPU after the kill under a quarter of CPU while it ran", owner="generation")
    def _():
        script = ("import socket,sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); "
                  "s.sendall(open(sys.argv[2], 'rb').read()); print('sent', flush=True); s.recv(1)")
        body = payload(bundle, 20.0)
        head = (f"POST /v1/generate?max_new_tokens=512 HTTP/1.1\r\nHost: x\r\n{keys['plain_header']}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with tempfile.NamedTemporaryFile(suffix=".http") as request:
            request.write(head + body)
            request.flush()
            client = subprocess.Popen([sys.executable, "-c", script, str(port), request.name], stdout=subprocess.PIPE)
            client.stdout.readline()  # the request is on the wire
            busy = idle_cpu(a, after=1, window=2)
            client.send_signal(signal.SIGKILL)
            client.wait()
        after = idle_cpu(a, after=2, window=2)
        return (f"CPU {busy:.2f} cores while it ran, {after:.2f} cores 2-4 s after the kill",
                busy > 0 and after < busy / 4)

    settle(a)

    @attack("20 streams (max_new_tokens=300) abandoned after their first event",
            "each gets its first event, or a 503 past the queue of 16, within 120 s; CPU after under a quarter of CPU "
            "during", owner="generation")
    def _():
        first, missed = [], []

        def abandon(_: int) -> None:
            start = time.monotonic()
            try:
                with httpx.stream("POST", f"{a.url}/v1/generate", params={"max_new_tokens": 300, "stream": "true"},
                                  content=payload(bundle, 20.0), headers={**keys["plain"], **BINARY},
                                  timeout=120) as r:
                    if r.status_code != 200:
                        missed.append(str(r.status_code))
                        return
                    next(line for line in r.iter_lines() if line.startswith("data"))
                    first.append(time.monotonic() - start)
            except (httpx.HTTPError, StopIteration) as err:
                missed.append(type(err).__name__)

        start, cpu = time.monotonic(), a.cpu_seconds()
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(abandon, range(20)))
        busy = (a.cpu_seconds() - cpu) / (time.monotonic() - start)
        after = idle_cpu(a, after=2)
        return (f"{len(first)}/20 got a first event (slowest {max(first, default=float('nan')):.1f} s)"
                f"{'; the others: ' + ', '.join(missed) if missed else ''}; CPU "
                f"{busy:.2f} cores during, {after:.2f} cores 2-4 s after"), len(first) + missed.count("503") == 20 and after < busy / 4

    settle(a)

    @attack("64 concurrent requests (4x a queue of 16)", "every answer 200 or 503 (some 503); then 200 at once",
            owner="generation")
    def _():
        def ask(_: int):
            try:
                return http.post("/v1/generate", params={"max_new_tokens": 16}, content=payload(bundle, 20.0),
                                 headers={**keys["plain"], **BINARY}, timeout=300).status_code
            except httpx.HTTPError as err:
                return type(err).__name__

        with ThreadPoolExecutor(64) as pool:
            codes = list(pool.map(ask, range(64)))
        start = time.monotonic()
        after = http.post("/v1/generate", params={"max_new_tokens": 1}, content=payload(bundle, 20.0),
                          headers={**keys["plain"], **BINARY}).status_code
        counts = {str(c): codes.count(c) for c in sorted(set(codes), key=str)}
        return (f"{counts}; next request {after} in {time.monotonic() - start:.1f} s",
                set(codes) <= {200, 503} and 503 in codes and after == 200)

    settle(a)

    @attack("8 stop strings of 1000 characters, then a plain request 3 s later",
            "stop request refused (422) or answered; the plain one within 10 s", owner="generation")
    def _():
        stops = [("the capital " * 90)[:1000] + str(i) for i in range(8)]
        result: dict = {}

        def attacker() -> None:
            start = time.monotonic()
            try:
                r = httpx.post(f"{a.url}/v1/generate", params={"max_new_tokens": 2, "stop": stops},
                               content=payload(bundle, 20.0), headers={**keys["plain"], **BINARY}, timeout=120)
                result["attack"], result["status"] = f"{r.status_code} in {time.monotonic() - start:.1f} s", r.status_code
            except httpx.HTTPError as err:
                result["attack"] = type(err).__name__

        thread = threading.Thread(target=attacker)
        thread.start()
        time.sleep(3)
        start = time.monotonic()
        try:
            plain = http.post("/v1/generate", params={"max_new_tokens": 2}, content=payload(bundle, 20.0),
                              headers={**keys["plain"], **BINARY}, timeout=60).status_code
        except httpx.TimeoutException:
            plain = "timeout"
        seconds = time.monotonic() - start
        thread.join()
        return (f"stop request: {result.get('attack')}; plain request {plain} in {seconds:.1f} s",
                result.get("status") in (200, 422) and plain == 200 and seconds <= 10)

    settle(a)

    @attack("400 requests with a wrong admin key, 100 with a wrong client key", "429 after 10; audit.log bounded")
    def _():
        audit = cache / "audit.log"
        lines_before = len(audit.read_text().splitlines()) if audit.exists() else 0
        codes = [http.get("/admin/jobs", headers={"Authorization": "Bearer wrong"}).status_code for _ in range(400)]
        codes += [http.get("/v1/bundle", headers={"Authorization": "Bearer veil_0_x"}).status_code
                  for _ in range(100)]
        added = len(audit.read_text().splitlines()) - lines_before
        return (f"{codes.count(403)} x 403, {codes.count(429)} x 429; {added} audit lines"),\
            codes.count(403) == 10 and codes.count(429) == 490 and added == 10

    @attack("the right client and admin keys from the address just throttled", "200 each; a wrong key still 429")
    def _():
        codes = [http.get("/v1/bundle", headers=keys["plain"]).status_code,
                 http.get("/admin/jobs", headers=ADMIN).status_code,
                 http.get("/v1/bundle", headers={"Authorization": "Bearer veil_0_x"}).status_code]
        return str(codes), codes == [200, 200, 429]

    @attack("payload with scale A = 3e38 (clip 2)", "400: over the largest A the mechanism produces")
    def _():
        info = next(p for p in bundle["projections"] if p["id"] == bundle["defaults"]["projection_id"])
        params = MechanismParams(bits=4, dim=info["dim"], clip=info["clip"], scale=3e38)
        body = wire.encode(wire.Payload(params, info["id"], np.zeros((2, info["dim"]), dtype=np.uint8)))
        r = http.post("/v1/generate", params={"max_new_tokens": 1}, content=body, headers={**keys["plain"], **BINARY})
        return f"{r.status_code} {r.json().get('detail', '')[:100]}", r.status_code == 400

    @attack("what `veil serve` prints", "veil.access JSON lines; no query strings (no uvicorn access log)")
    def _():
        lines = a.log.read_text(errors="replace").splitlines()
        access = [l for l in lines if l.startswith("{") and '"route"' in l]
        queries = [l for l in lines if "max_new_tokens=" in l or "stop=" in l]
        return f"{len(access)} JSON access lines, {len(queries)} lines with a query string", access and not queries


def against_b(b: Served) -> None:
    """Server B: admin API off, client keys off, 20 requests a minute."""
    port = int(b.url.rsplit(":", 1)[1])

    @attack("30 requests with a rotating X-Forwarded-For (no trusted proxy, 20 a minute)", "the last 10 get 429")
    def _():
        codes = [httpx.get(f"{b.url}/v1/bundle", headers={"X-Forwarded-For": f"10.1.{i}.{i}"}).status_code
                 for i in range(30)]
        return f"{codes.count(200)} x 200, {codes.count(429)} x 429", codes == [200] * 20 + [429] * 10

    @attack("50 MB body to a disabled admin API", "403 before the body is read; peak memory +<10 MiB")
    def _():
        before = b.status("VmHWM")
        head = (f"POST /admin/projections HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {50 * 2**20}\r\n\r\n").encode()
        status, seconds = raw_status(port, head, [b" " * 2**20] * 50, gap=0.05, wait=30)
        grown = (b.status("VmHWM") - before) / 1024
        return f"{status} after {seconds:.1f} s; peak RSS +{grown:.1f} MiB", " 403 " in status and grown < 10


def markdown(results: dict) -> str:
    """The results as SECURITY.md carries them: the command, the date and the pass count, then the server's table
    (one row per attack on `veil serve`) and the device's (one row per attack on the SDK)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    def table(rows: list[dict]) -> list[str]:
        return ["| attack | expected | observed | result |", "| --- | --- | --- | --- |"] + [
            f"| {cell(r['attack'])} | {cell(r['expected'])} | {cell(r['observed'])} | "
            f"{'pass' if r['pass'] else '**fail**'} |" for r in rows]

    server = [r for r in results["rows"] if r["owner"] != "device"]
    device = [r for r in results["rows"] if r["owner"] == "device"]
    lines = [f"`{results['command']}` on {results['date']}: {results['passed']} of {len(results['rows'])} rows pass.",
             "", f"The server ({sum(r['pass'] for r in server)} of {len(server)}):", "", *table(server)]
    if device:
        lines += ["", f"The device: the SDK against a fake server ({sum(r['pass'] for r in device)} of {len(device)}):",
                  "", *table(device)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'tiny' (a random 2-layer Llama) or a model spec")
    parser.add_argument("--port", type=int, default=8790)
    args = parser.parse_args()
    print("the device: the SDK against a fake server on 127.0.0.1")
    against_device(attack)  # first: it needs no model, and fails fast if the SDK regressed
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model == "tiny":
            model = tiny_model(root / "tiny")
        else:  # converted once into the usual cache; the servers get fresh caches for keys, jobs and logs
            from app.model_runner import resolve_model
            from app.settings import ServerSettings

            model = resolve_model(args.model, ServerSettings().cache_dir)
        common = {"VEIL_MODEL": model, "VEIL_SOFT_PROMPT_DIR": str(root / "soft_prompts"),
                  "VEIL_PROJECTION_DIR": str(root / "projections"), "VEIL_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
                  "VEIL_MAX_QUEUE": "16"}
        cache_a = root / "cache-a"
        store = KeyStore(cache_a / "api-keys.json")
        keys = {name: {"Authorization": f"Bearer {store.create(name, None if name == 'plain' else name)[1]}"}
                for name in ("acme", "globex", "plain")}
        keys["plain_header"] = f"Authorization: {keys['plain']['Authorization']}"
        env_a = {**common, "VEIL_CACHE_DIR": str(cache_a), "VEIL_ADMIN_KEY": ADMIN["Authorization"].split()[1],
                 "VEIL_REQUIRE_API_KEY": "true", "VEIL_RATE_LIMIT_PER_MINUTE": "100000"}
        env_b = {**common, "VEIL_CACHE_DIR": str(root / "cache-b"), "VEIL_RATE_LIMIT_PER_MINUTE": "20"}
        print(f"server B (keys off, admin off) on port {args.port + 1}")
        with served(args.port + 1, env_b, root / "b.log") as b:
            against_b(b)
        print(f"server A (keys and admin on) on port {args.port}")
        with served(args.port, env_a, root / "a.log") as a:
            against_a(a, cache_a, keys)
    width = max(len(r["attack"]) for r in ROWS)
    print(f"\n{'attack':<{width}}  {'expected':<60}  result  observed")
    for r in ROWS:
        print(f"{r['attack']:<{width}}  {r['expected']:<60}  {'pass' if r['pass'] else 'FAIL'}    {r['observed']}")
    passed = sum(r["pass"] for r in ROWS)
    print(f"\n{passed}/{len(ROWS)} rows pass (model {args.model})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = {"model": args.model, "command": f"veil bench abuse --model {args.model}",
               "date": time.strftime("%Y-%m-%d", time.gmtime()), "passed": passed, "rows": ROWS}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    TABLE.write_text(markdown(results))


if __name__ == "__main__":
    main()
