"""The client's half of the `veil` command line: `veil privacy`, which needs nothing but the SDK, and `veil gateway`
(the SDK behind an OpenAI-compatible endpoint; the `gateway` extra).

The server's commands (serve, demo, train, keys, bench) are added to the same `cli` by `app.cli`, the entry point;
this module never imports the server."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from client_sdk.accounting import DEFAULT_DELTA, privacy_report
from client_sdk.mechanism import MechanismParams

cli = typer.Typer(help="veil: private split inference for LLMs (DEL).", no_args_is_help=True, add_completion=False)


@cli.callback()
def _root() -> None:
    """veil: private split inference for LLMs (DEL)."""


@cli.command()
def privacy(
    bits: int = typer.Option(4, "--bits", "-n", help="n, bits per coordinate (1..8)"),
    dim: int = typer.Option(128, "--dim", "-k", help="k, projected dimensions per token"),
    clip: float = typer.Option(0.05, "--clip", "-c", help="c, clipping bound per coordinate"),
    mu: float | None = typer.Option(None, "--mu", help="target per-token CLT mu (calibrates A)"),
    scale: float | None = typer.Option(None, "--scale", "-A", help="the scale A directly, instead of --mu"),
    tokens: int = typer.Option(1, "--tokens", "-T", help="prompt length T for the whole-prompt epsilon"),
    delta: float = typer.Option(DEFAULT_DELTA, "--delta", help="delta of the (epsilon, delta) guarantee"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Exact privacy of a mechanism setting: epsilon per token and per prompt, with the paper's CLT mu and gamma."""
    if (mu is None) == (scale is None):
        raise typer.BadParameter("give exactly one of --mu and --scale")
    try:
        params = (MechanismParams.from_mu(mu, bits=bits, dim=dim, clip=clip) if mu is not None
                  else MechanismParams(bits=bits, dim=dim, clip=clip, scale=scale))
        report = privacy_report(params, tokens, delta)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    if as_json:
        typer.echo(json.dumps(report.model_dump()))
        return
    typer.echo(f"mechanism: n={bits} bits, k={dim}, c={params.clip:.6g}, A={params.scale:.6g}, u={params.levels}")
    typer.echo(f"per token:      epsilon={report.epsilon_per_token:.6g} at delta={delta:g} (exact)")
    typer.echo(f"prompt of {tokens}:  epsilon={report.epsilon:.6g} at delta={delta:g} (exact)")
    typer.echo(f"paper's CLT:    mu={report.mu_clt:.6g} per token (epsilon {report.epsilon_clt_per_token:.6g}), "
               f"Berry-Esseen gamma={report.gamma:.3g}")
    typer.echo(f"fitted GDP:     mu={report.mu_fitted:.6g} per token (the exact mechanism is mu-GDP)")
    typer.echo(f"bits on the wire: {report.bits_sent} for {tokens} token(s)")


def _gateway_keys(path: Path | None) -> dict[str, str]:
    """secret -> budget key, from a JSON file {budget key: secret}."""
    if path is None:
        return {}
    try:
        keys = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise typer.BadParameter(f"cannot read the keys file {path}: {err}") from None
    if not isinstance(keys, dict) or not keys or not all(isinstance(k, str) and isinstance(v, str) and len(v) >= 16
                                                         for k, v in keys.items()):
        raise typer.BadParameter(f"{path} must be a JSON object {{budget key: secret of 16+ characters}}")
    if len(set(keys.values())) != len(keys):
        raise typer.BadParameter(f"{path} gives two budget keys the same secret")
    return {secret: key for key, secret in keys.items()}


@cli.command()
def gateway(
    server: str = typer.Option(..., help="the veil server, e.g. https://veil-host:8000"),
    host: str = typer.Option("127.0.0.1", help="bind address; other than loopback only with --keys-file"),
    port: int = typer.Option(8787),
    private: str = typer.Option("whole", help="what is private: whole (every message, noised), markup "
                                "(inline markup: double-bracketed text noised, or a placeholder with |LABEL; the "
                                "rest public) or detect (detected identifiers become placeholders, the rest "
                                "public)"),
    keys_file: Path | None = typer.Option(None, help="JSON {budget key: secret}: callers must send a secret "
                                          "as their API key and spend that key's budget"),
    server_api_key: str | None = typer.Option(None, envvar="VEIL_API_KEY", help="the veil server's client key"),
    ledger: Path | None = typer.Option(None, help="the budget ledger (default: the SDK's, in the user's data "
                                       "directory)"),
    default_max_tokens: int = typer.Option(256, min=1, help="max_tokens when a request gives none"),
) -> None:
    """An OpenAI-compatible endpoint (/v1/chat/completions, /v1/models) that privatizes every prompt on this
    device with the SDK, under the default privacy policy, and a page of the last requests at /."""
    import ipaddress

    try:
        import uvicorn

        from client_sdk.client import AsyncPrivateLLMClient
        from client_sdk.gateway import MODES, GatewayConfig, create_gateway
    except ImportError as err:
        raise typer.BadParameter(f"the gateway needs its extra: pip install 'veil[gateway]' ({err})") from None
    if private not in MODES:
        raise typer.BadParameter(f"--private must be one of {', '.join(MODES)}")
    keys = _gateway_keys(keys_file)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not keys and not loopback:
        raise typer.BadParameter(f"without --keys-file the gateway serves this machine only; refusing --host {host}")
    client = AsyncPrivateLLMClient(server, api_key=server_api_key, ledger=ledger)
    config = GatewayConfig(mode=private, keys=keys, default_max_tokens=default_max_tokens)
    typer.echo(f"veil gateway: http://{host}:{port}/v1 -> {server}, --private {private}; "
               + (f"{len(keys)} gateway keys, each its own budget" if keys else
                  "no gateway keys: listening on loopback only, the `user` field picks the budget key"))
    typer.echo(f"the last requests: http://{host}:{port}/ (from this machine only)")
    uvicorn.run(create_gateway(client, config), host=host, port=port, log_level="warning")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
