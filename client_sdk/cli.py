"""The client's half of the `veil` command line: `veil privacy`, which needs nothing but the SDK.

The server's commands (serve, demo, train, keys, bench) are added to the same `cli` by `app.cli`, the entry point;
this module never imports the server."""

from __future__ import annotations

import json

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


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
