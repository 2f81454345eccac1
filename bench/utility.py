"""Perplexity of WikiText-2 test continuations given a privatized prefix, for the shipped artifacts.

    python -m bench.utility [--segments 40] [--mu 1.5 10 50] [--bits 4] [--seed 0]

Every row scores the same fixed sample (evenly spaced 64-token prefix + 64-token continuation segments)
with the same noise seed per mu. The prefix goes through the client's real path: its int8 projected
table, the clip and the stochastic quantizer, then the server's dequantization and decoder.

Floors: sending nothing (the continuation after one start token); each level's soft prompt with nothing
sent; and each level's soft prompt after the privatized prefix of *another* segment, which has the same noise
but no information about this continuation: the gap between it and the matched row is what the private
prompt itself contributes, as opposed to what the soft prompt knows about the domain. Two attacks by the server on
the same payloads report the share of prompt tokens it recovers exactly (see bench/attacks.py).
"Retained" is (NLL_nothing - NLL_row) / (NLL_nothing - NLL_clean).

Prints a markdown table, writes bench/results/utility.json, and (with matplotlib, `pip install .[bench]`)
plots it with the artifacts' training curves to docs/img/utility.png and docs/img/training-curves.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from app.artifacts import manifests
from app.model_runner import ModelRunner
from app.reconstruction import Projection, load_projection, pca_projection, publish
from app.settings import ServerSettings
from app.soft_prompts import load_soft_prompt
from app.training.evaluate import start_prefix
from bench.attacks import maximum_likelihood, nearest_neighbour, recovery_rate
from bench.pipeline import (
    CONTINUATION,
    PREFIX,
    load_sample,
    mean_nll,
    reconstruct,
    send,
    start_token,
)
from bench.plotting import pyplot
from client_sdk.accounting import privacy_report
from client_sdk.bundle import load_projected_table
from client_sdk.mechanism import MechanismParams

RESULTS = Path(__file__).parent / "results" / "utility.json"
IMAGES = Path(__file__).parents[1] / "docs" / "img"
PROJECTIONS = {"PCA": None, "noise-free trained": "smollm2-k72-noise-free",
               "noise-aware trained": "smollm2-k72-noise-aware"}
SOFT_PROMPT = "smollm2-k72-n{bits}-mu{mu:g}"
MISMATCHED = "noise-aware trained + soft prompt, another segment's prefix"


def attack_rates(levels: np.ndarray, projection: Projection, projected: np.ndarray, table: torch.Tensor,
                 params: MechanismParams, truth: torch.Tensor) -> dict[str, float]:
    """Exact token recovery by the server: nearest-neighbour inversion and the maximum-likelihood attack."""
    flat = levels.reshape(-1, levels.shape[-1])
    rebuilt = reconstruct(projection, flat, params).numpy()
    return {"nearest-neighbour attack": recovery_rate(nearest_neighbour(rebuilt, table.numpy()), truth.flatten()),
            "maximum-likelihood attack": recovery_rate(maximum_likelihood(flat, projected, params), truth.flatten())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=40)
    parser.add_argument("--mu", type=float, nargs="+", default=[1.5, 10.0, 50.0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    settings = ServerSettings()
    runner = ModelRunner.load(settings.model, settings.cache_dir)
    model, table = runner.model, runner.input_embeddings.detach()
    prefix_ids, continuations = load_sample(runner, settings.data_dir, args.segments)
    start_id = start_token(runner.tokenizer)
    started = time.perf_counter()
    nll = {"clean prefix": mean_nll(model, table[prefix_ids], continuations),
           "sending nothing": mean_nll(model, start_prefix(model, start_id, len(continuations)), continuations)}
    projections = {label: (pca_projection(table, 72, settings.clip) if name is None
                           else load_projection(settings.projection_dir / name)) for label, name in PROJECTIONS.items()}
    client_tables = {label: load_projected_table(publish(p, table).table_bytes) for label, p in projections.items()}
    levels = []
    for mu in args.mu:
        params = MechanismParams.from_mu(mu, bits=args.bits, dim=72, clip=settings.clip)
        report = privacy_report(params, PREFIX)
        soft = load_soft_prompt(settings.soft_prompt_dir / SOFT_PROMPT.format(bits=args.bits, mu=mu)).embeddings
        soft_batch = soft.expand(len(continuations), -1, -1)
        row = {"mu": mu, "epsilon_per_token": report.epsilon_per_token, "epsilon_prompt": report.epsilon,
               "soft prompt, nothing sent": mean_nll(model, soft_batch, continuations)}
        for label, projection in projections.items():
            sent = send(client_tables[label], prefix_ids, params, args.seed)
            prefix = reconstruct(projection, sent, params)
            row[f"{label}, no soft prompt"] = mean_nll(model, prefix, continuations)
            if label == "noise-aware trained":
                row[f"{label} + soft prompt"] = mean_nll(model, torch.cat([soft_batch, prefix], 1), continuations)
                row[MISMATCHED] = mean_nll(model, torch.cat([soft_batch, prefix.roll(1, 0)], 1), continuations)
                row["attacks"] = attack_rates(sent, projection, client_tables[label], table, params, prefix_ids)
        levels.append(row)
        print(f"mu={mu:g} done ({time.perf_counter() - started:.0f} s)", flush=True)

    def retained(value: float) -> float:
        return (nll["sending nothing"] - value) / (nll["sending nothing"] - nll["clean prefix"])

    labels = [k for k in levels[0] if k not in ("mu", "epsilon_per_token", "epsilon_prompt", "attacks")]
    print(f"\nSmolLM2-135M-Instruct, WikiText-2 test, {len(continuations)} segments of {PREFIX}+{CONTINUATION} tokens, "
          f"k=72, n={args.bits}; perplexity (context retained)\n")
    print("| row | " + " | ".join(f"mu={r['mu']:g} (eps {r['epsilon_per_token']:.3g}/token, "
                                    f"{r['epsilon_prompt']:.3g}/prompt)" for r in levels) + " |")
    print("|---" * (len(levels) + 1) + "|")
    for label, value in nll.items():
        print(f"| {label} | " + " | ".join(f"{math.exp(value):.1f} ({retained(value):+.2f})" for _ in levels) + " |")
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{math.exp(r[label]):.1f} ({retained(r[label]):+.2f})"
                                          for r in levels) + " |")
    for attack in levels[0]["attacks"]:
        print(f"| {attack}: tokens recovered (noise-aware projection) | "
              + " | ".join(f"{r['attacks'][attack]:.1%}" for r in levels) + " |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"segments": len(continuations), "bits": args.bits, "seed": args.seed,
                                   "nll": nll, "levels": levels,
                                   "seconds": time.perf_counter() - started}, indent=2) + "\n")
    plot(nll, levels, labels, settings)


def plot(nll: dict[str, float], levels: list[dict], labels: list[str], settings: ServerSettings) -> None:
    """Perplexity per row and level against the two references, and every shipped artifact's loss curve."""
    plt = pyplot()
    if plt is None:
        return
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ax.bar([x + i * width for x in range(len(levels))], [math.exp(r[label]) for r in levels], width, label=label)
    for label, style in (("sending nothing", "--"), ("clean prefix", ":")):
        ax.axhline(math.exp(nll[label]), color="black", linestyle=style, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(levels))],
                  [f"mu={r['mu']:g}\neps {r['epsilon_per_token']:.3g}/token" for r in levels])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity of the continuation (log scale)")
    ax.set_title("SmolLM2-135M, WikiText-2 test: lower is better; above the dashed line is worse than sending nothing",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(IMAGES / "utility.png", dpi=120)

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
    print(f"plots: {IMAGES / 'utility.png'}, {IMAGES / 'training-curves.png'}")


if __name__ == "__main__":
    main()
