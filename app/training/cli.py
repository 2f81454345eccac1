"""`veil train projection` and `veil train soft-prompt`: training jobs from the command line.

Torch and the model are imported inside the commands, so `veil` itself starts without them.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import typer

train_cli = typer.Typer(help="Train projections and soft prompts (needs `pip install .[server]`).",
                        no_args_is_help=True)

MODEL = typer.Option(None, help="'smollm2' (default), a Hugging Face id or a local directory")
DATA = typer.Option("wikitext-2-valid", help="a corpus name (see app.training.data.CORPORA) or upload:<sha256>")
CHECKPOINT = typer.Option(None, help="checkpoint file (default: <cache>/checkpoints/<kind>-<name>.pt); "
                                     "a run with the same settings resumes from it")
ACTIVATE = typer.Option(False, "--activate", help="mark the artifact served")
BATCH_SIZE = typer.Option(8, help="segments per step")
PREFIX_TOKENS = typer.Option(64, help="tokens per segment sent privately (the prompt part)")
CONTINUATION_TOKENS = typer.Option(64, help="clean tokens per segment after them (the answer part)")
SEED = typer.Option(0, help="seeds each step's batch and noise (a resumed run repeats them exactly)")


def _run(kind: str, fields: dict, model: str | None, checkpoint: Path | None, activate: bool) -> None:
    from pydantic import ValidationError
    from tqdm import tqdm

    from app.model_runner import ModelRunner
    from app.service import published_projections
    from app.settings import ServerSettings
    from app.training.jobs import CONFIGS, artifact_root, charge_tenant, current_projections, run_training
    from app.training.tenant_budget import BudgetExceeded

    settings = ServerSettings(**({"model": model} if model else {}))
    runner = ModelRunner.load(settings.model, settings.cache_dir, settings.device)
    if kind != "projection" and fields["projection_id"] is None:
        fields["projection_id"] = next(iter(published_projections(runner, settings)[0]))
    try:
        config = CONFIGS[kind](**fields)
    except ValidationError as err:
        raise typer.BadParameter(str(err)) from None
    if kind == "dp_soft_prompt":
        try:
            charge_tenant(settings, config, f"cli-{config.name}-{uuid.uuid4().hex[:8]}")
        except BudgetExceeded as err:
            raise typer.BadParameter(str(err)) from None
    checkpoint = checkpoint or settings.cache_dir / "checkpoints" / f"{kind}-{config.name}.pt"
    projections = {} if kind == "projection" else current_projections(runner, settings)
    bar = tqdm(total=config.steps, desc=f"{kind} {config.name}", unit="step")

    def on_step(step: int, loss: float | None) -> None:
        bar.n = step
        bar.set_postfix(loss="no examples" if loss is None else f"{loss:.3f}")

    try:
        manifest = run_training(runner, settings, config, projections, activate=activate, checkpoint=checkpoint,
                                on_step=on_step)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    finally:
        bar.close()
    root = artifact_root(settings, kind)
    held = {k: round(v, 4) for k, v in manifest.items() if k.startswith("held_out_loss")}
    typer.echo(f"wrote {root / config.name} ({'active' if manifest['active'] else 'inactive'}); held-out loss {held}")
    if "floor_check" in manifest:
        typer.echo(manifest["floor_check"]["reason"])
    if "dp" in manifest:
        dp = manifest["dp"]
        typer.echo(f"DP-SGD: epsilon {dp['epsilon']:.3g} at delta {dp['delta']:.2g} (noise multiplier "
                   f"{dp['noise_multiplier']:.3g}, clip {dp['max_grad_norm']:g}, sampling rate {dp['sample_rate']:.3g}, "
                   f"{dp['steps']} steps), charged to tenant {dp['tenant']!r}")


@train_cli.command("projection")
def projection(
    name: str = typer.Option(..., help="artifact name (folder under projections/)"),
    data: str = DATA,
    dim: int = typer.Option(72, "--dim", "-k", help="k, the projected width"),
    clip: float = typer.Option(2.0, "--clip", "-c", help="c, in standard deviations of the PCA start"),
    noise_aware: bool = typer.Option(True, "--noise-aware/--noise-free",
                                     help="train with the clip and quantizer in the loop (or without, as the paper)"),
    bits: int = typer.Option(4, "--bits", "-n"),
    mu_min: float = typer.Option(10.0, help="noise-aware: per-segment mu is log-uniform in [mu_min, mu_max]"),
    mu_max: float = typer.Option(50.0),
    lr: float = typer.Option(1e-3, help="Adam learning rate"),
    steps: int = typer.Option(150),
    batch_size: int = BATCH_SIZE,
    prefix_tokens: int = PREFIX_TOKENS,
    continuation_tokens: int = CONTINUATION_TOKENS,
    seed: int = SEED,
    model: str | None = MODEL,
    checkpoint: Path | None = CHECKPOINT,
    activate: bool = ACTIVATE,
) -> None:
    """Train a projection (encoder and decoder) with the LLM frozen, starting from whitened PCA."""
    fields = dict(name=name, data=data, dim=dim, clip=clip, noise_aware=noise_aware, bits=bits, mu_min=mu_min,
                  mu_max=mu_max, steps=steps, batch_size=batch_size, lr=lr, prefix_tokens=prefix_tokens,
                  continuation_tokens=continuation_tokens, seed=seed)
    _run("projection", fields, model, checkpoint, activate)


@train_cli.command("soft-prompt")
def soft_prompt(
    name: str = typer.Option(..., help="artifact name (folder under soft_prompts/)"),
    mu: float = typer.Option(..., help="per-token CLT mu of the mechanism it serves"),
    bits: int = typer.Option(4, "--bits", "-n"),
    projection_id: str | None = typer.Option(None, "--projection", help="projection id (default: the server's)"),
    data: str = DATA,
    virtual_tokens: int = typer.Option(32, "--virtual-tokens", "-m"),
    steps: int = typer.Option(100),
    batch_size: int = BATCH_SIZE,
    lr: float = typer.Option(1e-2),
    objective: str = typer.Option("next_token", help="next_token (loss on the text) or distill (KL from the clean "
                                                     "model given the clean prompt)"),
    chat_examples: int = typer.Option(0, help="chat examples to synthesize from the text with the model's own "
                                              "answers, trained on with the prose (0: prose only)"),
    floor_data: str = typer.Option("austen-emma", help="held-out corpus it must not be worse than sending nothing "
                                                       "on ('none': skip the check)"),
    prefix_tokens: int = PREFIX_TOKENS,
    continuation_tokens: int = CONTINUATION_TOKENS,
    seed: int = SEED,
    model: str | None = MODEL,
    checkpoint: Path | None = CHECKPOINT,
    activate: bool = ACTIVATE,
) -> None:
    """Train a soft prompt for one (projection, n, mu) with the mechanism active on the prompt part."""
    fields = dict(name=name, mu=mu, bits=bits, projection_id=projection_id, data=data,
                  virtual_tokens=virtual_tokens, steps=steps, batch_size=batch_size, lr=lr, objective=objective,
                  chat_examples=chat_examples, floor_data=None if floor_data == "none" else floor_data,
                  prefix_tokens=prefix_tokens, continuation_tokens=continuation_tokens, seed=seed)
    _run("soft_prompt", fields, model, checkpoint, activate)


@train_cli.command("dp-soft-prompt")
def dp_soft_prompt(
    name: str = typer.Option(..., help="artifact name (folder under soft_prompts/)"),
    tenant: str = typer.Option(..., help="whose data it is: their training budget is charged first"),
    epsilon: float = typer.Option(..., help="target epsilon of the whole training run"),
    mu: float = typer.Option(..., help="per-token CLT mu of the mechanism it serves"),
    data: str = typer.Option(..., help="the tenant's data: upload:<sha256> or a corpus name"),
    delta: float | None = typer.Option(None, help="default: min(1e-5, 1/n) for n training segments"),
    max_grad_norm: float = typer.Option(1.0, help="per-example gradient clip"),
    bits: int = typer.Option(4, "--bits", "-n"),
    projection_id: str | None = typer.Option(None, "--projection", help="projection id (default: the server's)"),
    virtual_tokens: int = typer.Option(32, "--virtual-tokens", "-m"),
    steps: int = typer.Option(30, help="logical steps (noise is added once per step)"),
    batch_size: int = typer.Option(16, help="expected segments per logical step (Poisson sampling)"),
    physical_batch_size: int = typer.Option(2, help="segments per micro-batch (memory only)"),
    lr: float = typer.Option(1e-2),
    accountant: str = typer.Option("prv", help="prv or rdp (Opacus)"),
    prefix_tokens: int = PREFIX_TOKENS,
    continuation_tokens: int = CONTINUATION_TOKENS,
    seed: int = typer.Option(0, help="seeds the prefix noise; DP noise and sampling come from the OS"),
    model: str | None = MODEL,
    activate: bool = ACTIVATE,
) -> None:
    """Train a soft prompt on a tenant's data with DP-SGD (Opacus) to a target (epsilon, delta)."""
    fields = dict(name=name, tenant=tenant, target_epsilon=epsilon, delta=delta, max_grad_norm=max_grad_norm, mu=mu,
                  bits=bits, projection_id=projection_id, data=data, virtual_tokens=virtual_tokens, steps=steps,
                  batch_size=batch_size, physical_batch_size=physical_batch_size, lr=lr, accountant=accountant,
                  prefix_tokens=prefix_tokens, continuation_tokens=continuation_tokens, seed=seed)
    _run("dp_soft_prompt", fields, model, None, activate)


@train_cli.command("check")
def check(
    names: list[str] = typer.Argument(..., help="soft prompts (folders under soft_prompts/)"),
    data: str = typer.Option("austen-emma", help="held-out corpus (one no prompt trained on)"),
    segments: int = typer.Option(32, help="evenly spaced segments of 64 + 64 tokens"),
    seed: int = typer.Option(0, help="seeds the prefix noise"),
    model: str | None = MODEL,
    record: bool = typer.Option(False, "--record", help="write the result into each manifest and deactivate "
                                                        "those worse than sending nothing"),
) -> None:
    """Score soft prompts on held-out text against sending nothing, the clean prefix and the mismatched control."""
    from app.artifacts import read_manifest
    from app.model_runner import ModelRunner
    from app.settings import ServerSettings
    from app.soft_prompts import load_soft_prompt, record_floor_check
    from app.training.config import load_text
    from app.training.floor import floor_check
    from app.training.jobs import current_projections, upload_dir

    settings = ServerSettings(**({"model": model} if model else {}))
    runner = ModelRunner.load(settings.model, settings.cache_dir, settings.device)
    projections = current_projections(runner, settings)
    text = load_text(data, settings.data_dir, upload_dir(settings))
    for name in names:
        directory = settings.soft_prompt_dir / name
        prompt = load_soft_prompt(directory)
        manifest = read_manifest(directory)
        result = floor_check(runner, projections[prompt.projection_id], prompt.bits, prompt.mu, prompt.embeddings,
                             text, data, segments=segments, seed=seed)
        ppl = {row: round(v, 1) for row, v in result["perplexity"].items()}
        typer.echo(f"{name} ({manifest.get('objective', 'next_token')}, n={prompt.bits}, mu={prompt.mu:g}): {ppl}; "
                   f"context retained {result['context_retained']:+.2f} (SE {result['context_retained_se']:.2f}); "
                   f"{result['reason']}")
        if record:
            record_floor_check(directory, result)
