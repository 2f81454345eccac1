"""Red team, device side (issue 24): a fake veil server on 127.0.0.1 (real HTTP) serves doctored bundles, chat
templates, tables, event streams and redirects to the SDK, under the SDK's default privacy policy.

Each attack changes one thing from an honest fake server (whose own row checks that a private generation goes
through), and expects a typed refusal (a `VeilError` subclass), within a time and memory bound, with nothing sent
unless the attack is on the answer. Rows go to bench.abuse's table with owner "device".
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import save
from tokenizers import Tokenizer, models, pre_tokenizers

from client_sdk import BudgetLedger, PrivateLLMClient, VeilError, wire
from client_sdk.bundle import MAX_BUNDLE_INFO_BYTES, MAX_TABLE_BYTES, MAX_TOKENIZER_BYTES, sha256_hex
from client_sdk.client import MAX_ANSWER_BYTES
from client_sdk.policy import REFERENCE_CLIP, REFERENCE_DIM, REFERENCE_MU
from client_sdk.schemas import BundleInfo, GenerateResponse, MechanismDefaults, ProjectionInfo
from client_sdk.templates import SHIPPED

WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "the", "capital", "of", "france",
         "is", "paris", "hello"]
ATTACK_TIMEOUT_S = 30.0
"""An attack still running after this long is a failed row (its thread is left behind, as a daemon)."""
LIMIT_S = 2.0
"""How long a refusal may take."""
MEMORY_MIB = 64
"""How much this process's peak resident memory may grow in one attack."""

Route = Callable[[BaseHTTPRequestHandler], None]


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str = "application/json",
         headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def answering(body: bytes, content_type: str) -> Route:
    """A /v1/generate route that reads the payload, then answers `body`."""
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        send(handler, 200, body, content_type)
    return route


def endless(declared: bool) -> Route:
    """A body of up to 1 GiB in one line, written until the client hangs up; with or without a Content-Length saying
    so (as an event stream: the client checks the type only where it expects one)."""
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.rfile.read(int(handler.headers.get("Content-Length", 0)))  # a payload, on /v1/generate
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        if declared:
            handler.send_header("Content-Length", str(1 << 30))
        handler.end_headers()
        try:
            for _ in range((1 << 30) // 65536):
                handler.wfile.write(b"x" * 65536)
        except OSError:  # the client hung up
            pass
    return route


class FakeServer:
    """An honest fake veil server (stdlib HTTP in a thread): a bundle built from a word-level tokenizer, a random
    projected table at the reference k and c, SmolLM2's shipped chat template, mu 4 suggested; /v1/generate decodes
    the payload and answers. An attack replaces `info` fields or routes."""

    def __init__(self) -> None:
        tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
        self.files: dict[str, bytes] = {}
        tokenizer_url = self.add_file(tokenizer.to_str().encode(), "tokenizer.json")
        table = np.random.default_rng(0).normal(scale=0.5, size=(len(WORDS), REFERENCE_DIM)).astype(np.float16)
        table_bytes = save({"table": table})
        pid = sha256_hex(table_bytes)[:16]
        self.info = BundleInfo(
            model_id="fake", vocab_size=len(WORDS), hidden_size=64, wire_version=wire.VERSION, max_prompt_tokens=256,
            tokenizer_url=tokenizer_url, tokenizer_sha256=sha256_hex(self.files[tokenizer_url]),
            chat_template=SHIPPED["SmolLM2-135M-Instruct"],
            projections=[ProjectionInfo(id=pid, dim=REFERENCE_DIM, clip=REFERENCE_CLIP,
                                        table_url=self.add_file(table_bytes, pid), table_sha256=sha256_hex(table_bytes))],
            defaults=MechanismDefaults(projection_id=pid, bits=4, mu=REFERENCE_MU))
        self.routes: dict[str, Route] = {}
        self.generate_requests = 0
        self.paths: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add_file(self, content: bytes, name: str) -> str:
        url = f"/v1/bundle/files/{name}"
        self.files[url] = content
        return url

    def replace_table(self, content: bytes) -> None:
        """Offer `content` as the projected table, its hash and id matching."""
        sha = sha256_hex(content)
        self.info.projections[0] = self.info.projections[0].model_copy(
            update={"id": sha[:16], "table_sha256": sha, "table_url": self.add_file(content, sha[:16])})
        self.info.defaults.projection_id = sha[:16]

    def replace_tokenizer(self, content: bytes) -> None:
        self.info.tokenizer_url, self.info.tokenizer_sha256 = self.add_file(content, "doctored.json"), sha256_hex(content)

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        payload = wire.decode(body, projections={p.id: p.dim for p in self.info.projections},
                              vocab_size=self.info.vocab_size)
        answer = GenerateResponse(text="paris", prompt_tokens=payload.tokens, completion_tokens=1)
        if "stream=true" in handler.path:
            stream = f"data: {json.dumps({'text': 'paris'})}\n\nevent: done\ndata: {answer.model_dump_json()}\n\n"
            send(handler, 200, stream.encode(), "text/event-stream")
        else:
            send(handler, 200, answer.model_dump_json().encode())

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                fake.paths.append(path)
                if path in fake.routes:
                    fake.routes[path](self)
                elif path == "/v1/bundle":
                    send(self, 200, fake.info.model_dump_json().encode())
                elif path in fake.files:
                    send(self, 200, fake.files[path], "application/octet-stream")
                else:
                    send(self, 404, b'{"error": "not_found", "detail": "no such route"}')

            def do_POST(self) -> None:
                path = self.path.split("?")[0]
                fake.paths.append(path)
                if path == "/v1/generate":
                    fake.generate_requests += 1
                (fake.routes.get(path) or fake.answer)(self)

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def reset_peak_rss() -> None:
    """Start this process's peak resident memory (VmHWM) over from its current size (Linux 4.0+), so that each
    attack's growth is its own, not hidden under an earlier attack's peak."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def within(seconds: float, call: Callable[[], object]) -> tuple[object, float]:
    """(what `call` returned or raised, seconds it took), or TimeoutError if it runs past `seconds`."""
    outcome: list = []

    def run() -> None:
        start = time.monotonic()
        try:
            outcome.append(call())
        except BaseException as err:  # the attack's outcome, reported by the row
            outcome.append(err)
        outcome.append(time.monotonic() - start)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"still running after {seconds:.0f} s")
    return outcome[0], outcome[1]


def against_device(attack: Callable[..., Callable]) -> None:
    """Every device-side attack, as rows of bench.abuse's table (`attack` is its row decorator)."""
    work = Path(tempfile.mkdtemp(prefix="veil-device-"))

    def device(name: str, expected: str) -> Callable:
        return attack(name, expected, owner="device")

    def refused(doctor: Callable[[FakeServer], None], expected_error: str, *, prompt_sent: bool = False,
                stream: bool = False, memory_mib: float = MEMORY_MIB, **client_args: object) -> tuple[str, bool]:
        """Run one generation against a doctored fake server with a fresh cache and ledger; pass if it raises
        `expected_error` within LIMIT_S and `memory_mib`, and sends a prompt only when the attack is on the answer."""
        fake = FakeServer()
        try:
            doctor(fake)
            folder = Path(tempfile.mkdtemp(dir=work))

            def generate() -> object:
                with PrivateLLMClient(fake.url, cache_dir=folder / "cache", **{"ledger": folder / "ledger.db",
                                                                              **client_args}) as client:
                    result = client.generate("the capital of france is", max_new_tokens=4, stream=stream)
                    return list(result) if stream else result

            reset_peak_rss()
            before = peak_rss_mib()
            outcome, seconds = within(ATTACK_TIMEOUT_S, generate)
            grown = peak_rss_mib() - before
            kind = type(outcome).__name__
            message = f": {str(outcome)[:90]}" if isinstance(outcome, Exception) else ""
            observed = (f"{kind} in {seconds:.2f} s{message}; peak memory +{max(grown, 0):.0f} MiB; "
                        f"{fake.generate_requests} prompts sent")
            passed = (isinstance(outcome, VeilError) and kind == expected_error and seconds <= LIMIT_S
                      and grown < memory_mib and fake.generate_requests == int(prompt_sent))
            return observed, passed
        finally:
            fake.close()

    nothing_sent = f"{{}} within {LIMIT_S:g} s, memory +<{MEMORY_MIB} MiB, nothing sent"

    @device("the honest fake server (the baseline every attack changes one thing of)",
            "the private prompt is sent once and answered")
    def _():
        fake = FakeServer()
        try:
            folder = Path(tempfile.mkdtemp(dir=work))
            with PrivateLLMClient(fake.url, cache_dir=folder / "cache", ledger=folder / "ledger.db") as client:
                result = client.generate("the capital of france is", max_new_tokens=4)
            return (f"answer {result.text!r}, {result.privacy.private_tokens} private tokens, "
                    f"{fake.generate_requests} sent"), result.text == "paris" and fake.generate_requests == 1
        finally:
            fake.close()

    template = SHIPPED["SmolLM2-135M-Instruct"]
    for name, hostile in [
        ("two nested range(100000) loops", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                           "{% endfor %}"),
        ("a 100,000-character string printed 100,000 times", "{% for i in range(100000) %}{{ 'x' * 100000 }}"
                                                              "{% endfor %}"),
    ]:
        @device(f"chat template with {name}", nothing_sent.format("BundleError"))
        def _(hostile: str = hostile):
            return refused(lambda f: setattr(f.info, "chat_template", hostile + template), "BundleError")

    for name, route, cap in [("/v1/bundle", "bundle", MAX_BUNDLE_INFO_BYTES),
                             ("tokenizer.json", "tokenizer", MAX_TOKENIZER_BYTES),
                             ("projected table", "table", MAX_TABLE_BYTES)]:
        for declared in (True, False):
            # declared: refused before the body is read; streamed: read up to the cap, then refused
            memory = MEMORY_MIB + (0 if declared else cap / 2**20)
            how = "declaring 1 GiB" if declared else "streaming 1 GiB, no length"

            @device(f"{name} {how} (its cap: {cap / 2**20:g} MiB)",
                    f"BundleError within {LIMIT_S:g} s, memory +<{memory:g} MiB, nothing sent")
            def _(route: str = route, declared: bool = declared, memory: float = memory):
                def doctor(fake: FakeServer) -> None:
                    path = {"bundle": "/v1/bundle", "tokenizer": fake.info.tokenizer_url,
                            "table": fake.info.projections[0].table_url}[route]
                    fake.routes[path] = endless(declared)
                return refused(doctor, "BundleError", memory_mib=memory)

    answer_memory = MEMORY_MIB + MAX_ANSWER_BYTES / 2**20
    for stream in (False, True):
        @device(f"{'an event stream' if stream else 'a JSON answer'} of 1 GiB in one line, no length (its cap: "
                f"{MAX_ANSWER_BYTES / 2**20:g} MiB)", f"ProtocolError within {LIMIT_S:g} s, memory +<{answer_memory:g} "
                                                      f"MiB (the prompt was sent)")
        def _(stream: bool = stream):
            return refused(lambda f: f.routes.update({"/v1/generate": endless(declared=False)}), "ProtocolError",
                           prompt_sent=True, stream=stream, memory_mib=answer_memory)

    rng = np.random.default_rng(1)
    doctored_tables = {
        "NaN values": save({"table": np.full((len(WORDS), REFERENCE_DIM), np.nan, dtype=np.float16)}),
        "random bytes": rng.bytes(4096),
        "the wrong shape": save({"table": np.zeros((len(WORDS), REFERENCE_DIM + 1), dtype=np.float16)}),
    }
    for name, content in doctored_tables.items():
        @device(f"projected table of {name} (hash matching)", nothing_sent.format("BundleError"))
        def _(content: bytes = content):
            return refused(lambda f: f.replace_table(content), "BundleError")

    @device("projected table whose bytes do not match its hash", nothing_sent.format("BundleError"))
    def _():
        def doctor(fake: FakeServer) -> None:
            fake.files[fake.info.projections[0].table_url] = save({"table": np.zeros((len(WORDS), REFERENCE_DIM),
                                                                                        dtype=np.float16)})
        return refused(doctor, "BundleError")

    for name, content in [("random bytes", rng.bytes(4096)), ("JSON that is not a tokenizer", b'{"model": 1}')]:
        @device(f"tokenizer.json of {name} (hash matching)", nothing_sent.format("BundleError"))
        def _(content: bytes = content):
            return refused(lambda f: f.replace_tokenizer(content), "BundleError")

    @device("bundle JSON missing its projections", nothing_sent.format("BundleError"))
    def _():
        def doctor(fake: FakeServer) -> None:
            body = fake.info.model_dump()
            del body["projections"]
            fake.routes["/v1/bundle"] = lambda h: send(h, 200, json.dumps(body).encode())
        return refused(doctor, "BundleError")

    @device("suggested mu = 1e-300", nothing_sent.format("BundleError"))
    def _():
        return refused(lambda f: setattr(f.info.defaults, "mu", 1e-300), "BundleError")

    @device("suggested mu = 50 (looser than the policy)", nothing_sent.format("PolicyError"))
    def _():
        return refused(lambda f: setattr(f.info.defaults, "mu", 50.0), "PolicyError")

    @device("table URL on another origin", nothing_sent.format("BundleError"))
    def _():
        def doctor(fake: FakeServer) -> None:
            fake.info.projections[0].table_url = "http://127.0.0.2:9/steal"
        return refused(doctor, "BundleError")

    @device("/v1/bundle redirects to another origin", "ServerError (not followed), the other origin gets no request, "
                                                       "nothing sent")
    def _():
        other = FakeServer()
        try:
            def doctor(fake: FakeServer) -> None:
                fake.routes["/v1/bundle"] = lambda h: send(h, 302, b"", headers={"Location": f"{other.url}/v1/bundle"})
            observed, passed = refused(doctor, "ServerError", api_key="device-secret")
            return f"{observed}; other origin saw {len(other.paths)} requests", passed and not other.paths
        finally:
            other.close()

    @device("/v1/generate redirects to another origin", "ServerError (not followed); the other origin gets nothing")
    def _():
        other = FakeServer()
        try:
            def doctor(fake: FakeServer) -> None:
                def redirect(h: BaseHTTPRequestHandler) -> None:
                    h.rfile.read(int(h.headers.get("Content-Length", 0)))
                    send(h, 307, b"", headers={"Location": f"{other.url}/v1/generate"})
                fake.routes["/v1/generate"] = redirect
            observed, passed = refused(doctor, "ServerError", prompt_sent=True, api_key="device-secret")
            return f"{observed}; other origin saw {len(other.paths)} requests", passed and not other.paths
        finally:
            other.close()

    streams = {
        "not JSON": b"data: not json\n\n",
        "a JSON list": b"data: [1, 2]\n\n",
        "text that is a number": b'data: {"text": 5}\n\n',
        "a final event missing its fields": b'event: done\ndata: {"text": "x"}\n\n',
        "no final event": b'data: {"text": "paris"}\n\n',
    }
    for name, body in streams.items():
        @device(f"event stream of {name}", f"ProtocolError within {LIMIT_S:g} s (the prompt was sent)")
        def _(body: bytes = body):
            return refused(lambda f: f.routes.update({"/v1/generate": answering(body, "text/event-stream")}),
                           "ProtocolError", prompt_sent=True, stream=True)

    @device("a stream answered as text/plain", f"ProtocolError within {LIMIT_S:g} s (the prompt was sent)")
    def _():
        return refused(lambda f: f.routes.update({"/v1/generate": answering(b"data: {}\n\n", "text/plain")}),
                       "ProtocolError", prompt_sent=True, stream=True)

    @device("an answer that is not JSON", f"ProtocolError within {LIMIT_S:g} s (the prompt was sent)")
    def _():
        return refused(lambda f: f.routes.update({"/v1/generate": answering(b"<html>", "application/json")}),
                       "ProtocolError", prompt_sent=True)

    @device("ledger.db restored from an older copy (1 charge of 4)", "LedgerError, nothing sent")
    def _():
        fake = FakeServer()
        try:
            folder = Path(tempfile.mkdtemp(dir=work))
            with PrivateLLMClient(fake.url, cache_dir=folder / "cache", ledger=folder / "ledger.db") as client:
                client.generate("the capital of france is", max_new_tokens=4)
                shutil.copy(folder / "ledger.db", folder / "backup.db")
                for prompt in ("hello", "paris is", "the capital"):
                    client.generate(prompt, max_new_tokens=4)
                spent = client.ledger.spent("default")
                shutil.copy(folder / "backup.db", folder / "ledger.db")
                sent = fake.generate_requests
                try:
                    client.generate("france", max_new_tokens=4)
                    outcome = "sent"
                except VeilError as err:
                    outcome = f"{type(err).__name__}: {str(err)[:90]}"
            return (f"{spent.charges} charges, epsilon {spent.epsilon:.1f}; after the restore: {outcome}; "
                    f"{fake.generate_requests - sent} sent"), outcome.startswith("LedgerError") and fake.generate_requests == sent
        finally:
            fake.close()

    @device("ledger in a folder the app cannot write", "LedgerError, nothing sent")
    def _():
        if os.geteuid() == 0:  # root writes through file modes; /sys is read-only to everyone
            folder = Path("/sys")
        else:
            folder = Path(tempfile.mkdtemp(dir=work)) / "read-only"
            folder.mkdir()
            folder.chmod(0o555)
        try:
            BudgetLedger(folder / "ledger.db")
            return "opened", False
        except VeilError as err:
            return f"{type(err).__name__}: {str(err)[:120]}", type(err).__name__ == "LedgerError"
        finally:
            if folder.exists() and os.geteuid() != 0:
                folder.chmod(0o755)

    shutil.rmtree(work, ignore_errors=True)
