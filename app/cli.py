"""The `veil` command line: the client's `veil privacy` (client_sdk.cli) plus the server's commands.

Server modules are imported inside the commands, so `veil privacy` works in a client-only install (no torch).
"""

from __future__ import annotations

from contextlib import contextmanager
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
    backend: str | None = typer.Option(None, help="what generates: transformers (default) or vllm (GPU)"),
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


@contextmanager
def local_server(port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """`veil serve` on 127.0.0.1:`port` in a subprocess; yields its URL once /readyz answers, stops it after."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                              env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise typer.Exit(f"the server exited with code {server.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).is_success:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise typer.Exit("the server did not start within 300 seconds")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@cli.command()
def demo(
    prompt: str = typer.Option("What is the capital of France?", help="the prompt to send privately"),
    mu: float | None = typer.Option(None, help="per-token CLT mu (default: the server's)"),
    bits: int | None = typer.Option(None, help="n bits per coordinate (default: the server's)"),
    max_new_tokens: int = typer.Option(32),
    port: int = typer.Option(8765),
) -> None:
    """Start the server on the default model, send one private prompt through the SDK, print what it cost."""
    from client_sdk.client import PrivateLLMClient

    with local_server(port) as url:
        with PrivateLLMClient(url, mu=mu, bits=bits) as client:
            result = client.generate(prompt, max_new_tokens=max_new_tokens)
            info = client.bundle.info
    report = result.privacy
    typer.echo(f"prompt (stays on this device): {prompt!r}")
    typer.echo(f"answer: {result.text!r}")
    if result.soft_prompt:
        match = "exact match" if result.soft_prompt_exact else "nearest trained mu"
        typer.echo(f"soft prompt used: {result.soft_prompt} (trained for mu={result.soft_prompt_mu:g}, {match})")
    else:
        typer.echo("soft prompt used: none (no trained soft prompt for this projection and n)")
    typer.echo(f"privacy: n={report.bits}, k={report.dim}, mu={report.mu_clt:.4g} per token; exact epsilon "
               f"{report.epsilon_per_token:.4g} per token, {report.epsilon:.4g} for the whole "
               f"{report.tokens}-token prompt (delta={report.delta:g})")
    fp32 = report.tokens * info.hidden_size * 4
    typer.echo(f"bytes sent: {result.bytes_sent} (fp32 embeddings would be {fp32}: "
               f"{fp32 / result.bytes_sent:.1f}x more)")


BENCHMARKS = ("client", "server", "privacy", "utility", "privacy-utility", "dp-soft-prompt", "load", "abuse",
              "rate-limit-store")


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context, name: str = typer.Argument(..., help=f"one of {', '.join(BENCHMARKS)}")) -> None:
    """Run a benchmark from bench/ (arguments after NAME go to it; `veil bench NAME -- --help` lists them)."""
    import runpy
    import sys

    if name not in BENCHMARKS:
        raise typer.BadParameter(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    sys.argv = [f"veil bench {name}", *ctx.args]
    runpy.run_module(f"bench.{name.replace('-', '_')}", run_name="__main__")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
