"""The `veil` command line: the client's `veil privacy` (client_sdk.cli) plus the server's commands.

Server modules are imported inside the commands, so `veil privacy` works in a client-only install (no torch).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer

from client_sdk.cli import cli

try:  # the training and key commands need the server extras
    from app.keys import keys_cli
    from app.training.cli import train_cli

    cli.add_typer(train_cli, name="train")
    cli.add_typer(keys_cli, name="keys")
except ImportError:
    pass


@cli.command()
def serve(
    model: str | None = typer.Option(None, help="'smollm2' (default), a Hugging Face id or a local directory"),
    host: str | None = typer.Option(None, help="bind address (default 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (default 8000)"),
    device: str | None = typer.Option(None, help="torch device, e.g. cpu or cuda"),
    backend: str | None = typer.Option(None, help="what generates: llamacpp (default on CPU when installed), "
                                       "transformers or vllm (GPU)"),
    replicas: int | None = typer.Option(None, min=1, help="serve N replicas with Ray Serve on a local Ray cluster, "
                                        "each its own model copy (needs `pip install .[ray]`; docs/DEPLOY.md)"),
    min_replicas: int | None = typer.Option(None, min=1, help="Ray Serve autoscaling: the fewest replicas"),
    max_replicas: int | None = typer.Option(None, min=1, help="Ray Serve autoscaling: the most replicas"),
) -> None:
    """Run the server (needs `pip install .[server]`); settings also come from VEIL_* variables."""
    import uvicorn

    from app.api import create_app, uvicorn_options
    from app.settings import ServerSettings

    overrides = {k: v for k, v in dict(model=model, host=host, port=port, device=device, backend=backend).items()
                 if v is not None}
    settings = ServerSettings(**overrides)
    if replicas is not None or min_replicas is not None or max_replicas is not None:
        try:
            from app.ray_serve import serve_replicas
        except ImportError as err:
            raise typer.BadParameter(f"replicas need Ray Serve: pip install '.[ray]' ({err})") from None
        if min_replicas is not None and max_replicas is not None and min_replicas > max_replicas:
            raise typer.BadParameter("--min-replicas must not exceed --max-replicas")
        serve_replicas(settings, replicas or 1, min_replicas, max_replicas)
        return
    uvicorn.run(create_app(settings), **uvicorn_options(settings))


def wait_until_ready(process, url: str, what: str, timeout: float) -> None:
    """Poll `url` until it answers 2xx; RuntimeError if `process` (a subprocess.Popen serving `what`) exits first or
    `timeout` seconds pass."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the {what} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=30).is_success:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {what} did not start within {timeout:g} seconds")
        time.sleep(0.2)


@contextmanager
def local_server(port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """`veil serve` on 127.0.0.1:`port` in a subprocess; yields its URL once /readyz answers, stops it after."""
    import os
    import subprocess
    import sys

    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                              env={**os.environ, **(env or {})})
    try:
        try:
            wait_until_ready(server, f"{url}/readyz", "server", 300)
        except RuntimeError as err:
            raise typer.Exit(str(err)) from None
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


OPERATING_POINT = Path(__file__).resolve().parents[1] / "bench" / "results" / "operating-point.json"


def _measured_recovery(report) -> str:
    """The strongest attack's measured recovery at this setting, from the evaluation's record of the SDK's default
    (bench/results/operating-point.json, `sdk_default`) when it was measured at these n, k and mu."""
    import json

    if not OPERATING_POINT.exists():
        return "not measured (bench/results/operating-point.json is absent)"
    point = json.loads(OPERATING_POINT.read_text())
    measured = point.get("sdk_default")
    if measured is None or (point["bits"], point["dim"]) != (report.bits, report.dim) or \
            abs(measured["mu"] / report.mu_clt - 1) > 1e-3:
        return (f"not measured at this setting; the strongest attack ({point['attack']}) reaches "
                f"{point['target']:.0%} of tokens at n={point['bits']}, k={point['dim']}, mu={point['mu']:.3g}")
    return (f"{measured['recovery']:.1%} (SE {measured['recovery_se']:.1%}) of tokens recovered by the strongest "
            f"attack ({measured['attack']}) at this setting, {measured['recovery_content']:.1%} of content words, "
            f"measured on {point['corpus']} ({point['command']})")


def _show_spans(client, messages, conversation, chat: bool = True) -> None:
    """What stays on the device (private spans, placeholders) and what the server sees in the clear."""
    spans = client.bundle.spans(messages, chat=chat, conversation=conversation)
    decode = client.bundle.tokenizer.decode
    for span in spans:
        text = decode(span.ids.tolist(), skip_special_tokens=False)
        label = "private: only noised levels leave" if span.private else "public: sent in the clear"
        typer.echo(f"  {label:40s} {text!r}")
    for name, original in conversation.originals.items():
        typer.echo(f"  {'placeholder (real text stays here)':40s} {name} = {original!r}")


DEMO_PROMPT = ("How should I tell my landlord Ann Whitfield in Harrogate that the rent from account 40381276 will be "
               "two days late?")


@cli.command()
def demo(
    prompt: str = typer.Option(DEMO_PROMPT, help="the user's message"),
    selective: bool = typer.Option(False, help="read inline markup in the prompt instead of detecting: [[text]] is "
                                   "noised, [[text|LABEL]] becomes a placeholder, the rest is public"),
    max_new_tokens: int = typer.Option(64),
    port: int = typer.Option(8765),
) -> None:
    """Start the server on the default model and send one prompt through the SDK twice under the default privacy
    policy: first with only what the device detects (names, places, identifiers) replaced by placeholders and
    restored in the answer, then wholly private; what stayed on the device, the epsilon spent, the attack rate."""
    import httpx

    from client_sdk.client import PrivateLLMClient
    from client_sdk.detect import detect_messages
    from client_sdk.spans import Conversation, as_messages, markup

    typer.echo(f"prompt: {prompt!r}")
    with local_server(port) as url:
        with PrivateLLMClient(url, budget_key="veil-demo") as client:
            typer.echo(f"server: the {httpx.get(f'{url}/readyz').json()['backend']} backend")
            conversation = Conversation()
            if selective:
                typer.echo("\n1. only the marked words private (--selective):")
                messages = as_messages([{"role": "user", "content": markup(prompt)}])
            else:
                typer.echo("\n1. only what this device detects private (private='detect'): detected on the device, "
                           "replaced by placeholders")
                messages = detect_messages(as_messages(prompt), client.policy.treatments)
            _show_spans(client, messages, conversation)
            detected = client.generate(messages, max_new_tokens=max_new_tokens, conversation=conversation)
            typer.echo(f"answer (placeholders restored on this device): {detected.text.strip()!r}")
            never_left = list(conversation.originals.values())
            typer.echo(f"never left this device: {', '.join(repr(v) for v in never_left) or 'nothing was replaced'}; "
                       f"epsilon spent: {detected.privacy.epsilon:.4g} ({detected.privacy.private_tokens} noised tokens)")
            typer.echo("\n2. the same prompt wholly private, the chat template too (chat=False): every token noised, "
                       "and the server prepends the soft prompt trained for this level")
            _show_spans(client, as_messages(prompt), Conversation(), chat=False)
            result = client.generate(prompt, max_new_tokens=max_new_tokens, chat=False)
            remaining = client.ledger.remaining("veil-demo")
            ledger_path = client.ledger.path
    report = result.privacy
    typer.echo(f"answer: {result.text.strip()!r}")
    typer.echo(f"privacy: {report.private_tokens} private tokens (noised), {report.public_tokens} public; n={report.bits}, "
               f"k={report.dim}, mu={report.mu_clt:.4g} per token, chosen on this device by the default policy")
    typer.echo(f"epsilon spent: {report.epsilon_per_token:.4g} per private token, {report.epsilon:.4g} for this prompt "
               f"(exact, delta={report.delta:g}); public tokens cost nothing")
    if remaining is not None:
        typer.echo(f"ledger: {ledger_path}, budget key 'veil-demo': {remaining:.4g} epsilon left (composed)")
    typer.echo(f"attack: {_measured_recovery(report)}")
    if report.private_tokens:
        typer.echo("what the noise costs: the server, and so the model, read the private tokens only through noise "
                   "strong enough that the best known attack recovers few of them, so the model cannot read them "
                   "either; with detection only the sensitive words are withheld and the rest stays readable.")
    if result.soft_prompt:
        typer.echo(f"soft prompt used: {result.soft_prompt} (trained for mu={result.soft_prompt_mu:g})")
    typer.echo(f"bytes sent: {detected.bytes_sent} (detected), {result.bytes_sent} (wholly private)")


BENCHMARKS = ("client", "server", "privacy", "utility", "privacy-utility", "dp-soft-prompt", "load", "abuse",
              "rate-limit-store", "ledger", "chat", "selective", "distill-lora", "gateway", "mutation", "detect",
              "backend-utility")


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def bench(ctx: typer.Context, name: str = typer.Argument(None, help=f"one of {', '.join(BENCHMARKS)}")) -> None:
    """Run a benchmark from bench/ (arguments after NAME go to it; `veil bench NAME --help` lists them)."""
    import runpy
    import sys

    if name in (None, "--help", "-h"):
        typer.echo(f"usage: veil bench NAME [ARGS]...; NAME is one of {', '.join(BENCHMARKS)}; "
                   "`veil bench NAME --help` lists the benchmark's own options")
        raise typer.Exit(0 if name else 2)
    if name not in BENCHMARKS:
        raise typer.BadParameter(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    sys.argv = [f"veil bench {name}", *ctx.args]
    runpy.run_module(f"bench.{name.replace('-', '_')}", run_name="__main__")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
