"""Perplexity of a text's continuations given a privatized prefix, for the shipped projections and soft prompts.

    python -m bench.utility [--corpus wikitext-2-test|austen-emma|PATH] [--segments 32] [--mu 1.5 10 50] [--bits 4]

Every row scores the same fixed sample (evenly spaced 64-token prefix + 64-token continuation segments of the
corpus: a named one or any UTF-8 text file) with the same noise seed per mu. The prefix goes through the client's
real path: its int8 projected table, the clip and the stochastic quantizer, then the server's dequantization and
decoder.

Every row is also scored after *another* segment's payload (the mismatched control: the same noise and artifacts,
no information about this continuation). Context retained is reported against that control and against sending
nothing, (NLL_ref - NLL_row) / (NLL_ref - NLL_clean), each with a bootstrap SE over segments; "(~0)" marks a figure
within 2 SE of its reference. Two attacks by the server on the same payloads report the share of prompt tokens it
recovers exactly (the strongest attacks are in bench/privacy_utility.py).

Prints a markdown table, writes bench/results/utility[-CORPUS].json (with the corpus's name and SHA-256), and (with
matplotlib, `pip install .[bench]`) plots it with the artifacts' training curves to docs/img/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from app.artifacts import manifests
from app.model_runner import ModelRunner
from app.provenance import package_versions
from app.reconstruction import Projection, load_projection, pca_projection, publish
from app.settings import ServerSettings
from app.soft_prompts import load_soft_prompt
from app.training.evaluate import start_prefix
from bench.attacks import maximum_likelihood, nearest_neighbour, recovery_rate
from bench.bootstrap import within
from bench.pipeline import CONTINUATION, PREFIX, load_sample, reconstruct, segment_nlls, send, start_token
from bench.plotting import pyplot
from bench.privacy_utility_report import perplexity, retained
from client_sdk.accounting import privacy_report
from client_sdk.bundle import load_projected_table
from client_sdk.mechanism import MechanismParams

RESULTS = Path(__file__).parent / "results"
IMAGES = Path(__file__).parents[1] / "docs" / "img"
PROJECTIONS = {"PCA": None, "noise-free trained": "smollm2-k72-noise-free",
               "noise-aware trained": "smollm2-k72-noise-aware"}
SOFT_PROMPT = "smollm2-k72-n{bits}-mu{mu:g}"


def attack_rates(levels: np.ndarray, projection: Projection, projected: np.ndarray, table: torch.Tensor,
                 params: MechanismParams, truth: torch.Tensor) -> dict[str, float]:
    """Exact token recovery by the server: nearest-neighbour inversion and the maximum-likelihood attack."""
    flat = levels.reshape(-1, levels.shape[-1])
    rebuilt = reconstruct(projection, flat, params).numpy()
    return {"nearest-neighbour attack": recovery_rate(nearest_neighbour(rebuilt, table.numpy()), truth.flatten()),
            "maximum-likelihood attack": recovery_rate(maximum_likelihood(flat, projected, params), truth.flatten())}


def scored(model, prefix: torch.Tensor, continuations: torch.Tensor, soft: torch.Tensor | None = None) -> dict:
    """Per-segment NLLs after the prefix and after the next segment's prefix (the mismatched control)."""
    def with_soft(p: torch.Tensor) -> torch.Tensor:
        return p if soft is None else torch.cat([soft.expand(len(p), -1, -1), p], 1)

    return {"nll": segment_nlls(model, with_soft(prefix), continuations).tolist(),
            "nll_mismatched": segment_nlls(model, with_soft(prefix.roll(1, 0)), continuations).tolist()}


def describe(row: dict, floors: dict) -> str:
    """'perplexity ± SE (retained vs mismatched ± SE; vs nothing ± SE)'."""
    ppl, se = perplexity(row["nll"])
    parts = []
    for label, reference in (("vs mismatched", row.get("nll_mismatched")), ("vs nothing", floors["sending nothing"])):
        if reference is not None:
            value, error = retained(row["nll"], reference, floors["clean prefix"])
            parts.append(f"{label} {value:+.2f} ± {error:.2f}{' (~0)' if within(value, error) else ''}")
    return f"{ppl:.1f} ± {se:.1f}" + (f" ({'; '.join(parts)})" if parts else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="wikitext-2-test", help="a named corpus or a UTF-8 text file")
    parser.add_argument("--segments", type=int, default=32)
    parser.add_argument("--mu", type=float, nargs="+", default=[1.5, 10.0, 50.0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    settings = ServerSettings()
    runner = ModelRunner.load(settings.model, settings.cache_dir)
    model, table = runner.model, runner.input_embeddings.detach()
    sample = load_sample(runner.tokenizer, args.corpus, settings.data_dir, args.segments)
    prefix_ids, continuations = sample.prefix_ids, sample.continuations
    start_id = start_token(runner.tokenizer)
    started = time.perf_counter()
    nothing = start_prefix(model, start_id, len(continuations))
    floors = {"clean prefix": segment_nlls(model, table[prefix_ids], continuations).tolist(),
              "sending nothing": segment_nlls(model, nothing, continuations).tolist()}
    published = {label: (publish(pca_projection(table, 72, settings.clip), table) if name is None
                         else load_projection(settings.projection_dir / name)) for label, name in PROJECTIONS.items()}
    projections = {label: p.projection for label, p in published.items()}
    client_tables = {label: load_projected_table(p.table_bytes) for label, p in published.items()}
    levels = []
    for mu in args.mu:
        params = MechanismParams.from_mu(mu, bits=args.bits, dim=72, clip=settings.clip)
        report = privacy_report(params, PREFIX)
        soft = load_soft_prompt(settings.soft_prompt_dir / SOFT_PROMPT.format(bits=args.bits, mu=mu)).embeddings
        rows = {"soft prompt, nothing sent": {"nll": segment_nlls(
            model, torch.cat([soft.expand(len(continuations), -1, -1), nothing], 1), continuations).tolist()}}
        level = {"mu": mu, "epsilon_per_token": report.epsilon_per_token, "epsilon_prompt": report.epsilon,
                 "rows": rows}
        for label, projection in projections.items():
            sent = send(client_tables[label], prefix_ids, params, args.seed)
            prefix = reconstruct(projection, sent, params)
            rows[f"{label}, no soft prompt"] = scored(model, prefix, continuations)
            if label == "noise-aware trained":
                rows[f"{label} + soft prompt"] = scored(model, prefix, continuations, soft)
                level["attacks"] = attack_rates(sent, projection, client_tables[label], table, params, prefix_ids)
        levels.append(level)
        print(f"mu={mu:g} done ({time.perf_counter() - started:.0f} s)", flush=True)

    print(f"\n{runner.model_id}, {sample.corpus} (sha256 {sample.sha256[:16]}...), {len(continuations)} segments of "
          f"{PREFIX}+{CONTINUATION} tokens, k=72, n={args.bits}; perplexity ± SE (context retained)\n")
    print("| row | " + " | ".join(f"mu={r['mu']:g} (eps {r['epsilon_per_token']:.3g}/token, "
                                    f"{r['epsilon_prompt']:.3g}/prompt)" for r in levels) + " |")
    print("|---" * (len(levels) + 1) + "|")
    for label, values in floors.items():
        print(f"| {label} | " + " | ".join(describe({"nll": values}, floors) for _ in levels) + " |")
    for label in levels[0]["rows"]:
        print(f"| {label} | " + " | ".join(describe(r["rows"][label], floors) for r in levels) + " |")
    for attack in levels[0]["attacks"]:
        print(f"| {attack}: tokens recovered (noise-aware projection) | "
              + " | ".join(f"{r['attacks'][attack]:.1%}" for r in levels) + " |")
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if sample.corpus == "wikitext-2-test" else f"-{sample.corpus}"
    (RESULTS / f"utility{suffix}.json").write_text(json.dumps(
        {"corpus": sample.corpus, "sha256": sample.sha256, "segments": len(continuations), "bits": args.bits,
         "seed": args.seed, "base_model_sha256": runner.fingerprint,
         "projection_ids": {label: p.id for label, p in published.items()}, "versions": package_versions(),
         "floors": floors, "levels": levels, "seconds": time.perf_counter() - started},
        indent=2) + "\n")
    plot(floors, levels, sample.corpus, suffix, settings)


def plot(floors: dict[str, list[float]], levels: list[dict], corpus: str, suffix: str,
         settings: ServerSettings) -> None:
    """Perplexity per row and level against the two references, and every shipped artifact's loss curve."""
    plt = pyplot()
    if plt is None:
        return
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = list(levels[0]["rows"])
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        values = [perplexity(r["rows"][label]["nll"]) for r in levels]
        ax.bar([x + i * width for x in range(len(levels))], [v[0] for v in values], width,
               yerr=[2 * v[1] for v in values], capsize=2, label=label)
    for label, style in (("sending nothing", "--"), ("clean prefix", ":")):
        ax.axhline(perplexity(floors[label])[0], color="black", linestyle=style, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(levels))],
                  [f"mu={r['mu']:g}\neps {r['epsilon_per_token']:.3g}/token" for r in levels])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity of the continuation (log scale)")
    ax.set_title(f"SmolLM2-135M, {corpus}: lower is better (± 2 SE); above the dashed line is worse than sending "
                 "nothing", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(IMAGES / f"utility{suffix}.png", dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, root, title in ((axes[0], settings.projection_dir, "projections"),
                            (axes[1], settings.soft_prompt_dir, "soft prompts")):
        for name, manifest in manifests(root, "smollm2").items():
            curve = torch.tensor(manifest["loss_curve"])
            smooth = torch.nn.functional.avg_pool1d(curve[None, None], 10, 1)[0, 0] if len(curve) >= 10 else curve
            ax.plot(range(len(curve) - len(smooth) + 1, len(curve) + 1), smooth.numpy(), label=name)
        ax.set_title(f"{title}: training loss (mean of 10 steps)", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(IMAGES / "training-curves.png", dpi=120)
    print(f"plots: {IMAGES / f'utility{suffix}.png'}, {IMAGES / 'training-curves.png'}")


if __name__ == "__main__":
    main()
