"""Non-private against DP-SGD soft prompts trained on a tenant's data: held-out perplexity at epsilon 1, 3 and 8.

    veil bench dp-soft-prompt [--steps 20] [--batch-size 32] [--epsilons 1 3 8] [--fresh]

A public stand-in for private data: the tenant's examples are Pride and Prejudice; every prompt is evaluated on
Emma, a novel it never saw (evenly spaced 32 + 32-token segments, the prefix through the client's mechanism at the
server's default mu = 50 and n = 4, fixed noise). Every trained row uses the same steps, expected batch size and
learning rate; the DP rows add Poisson sampling, per-example clipping and noise calibrated by Opacus to (epsilon,
delta = 1e-5). References: no soft prompt, and the shipped WikiText-2 soft prompt for the same setting.

Resumable (each row is saved when done). Writes bench/results/dp-soft-prompt.json and docs/img/dp-soft-prompt.png.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from app.model_runner import ModelRunner
from app.reconstruction import load_projection
from app.settings import ServerSettings
from app.soft_prompts import load_soft_prompt
from app.training.config import held_out_loss
from app.training.data import evenly_spaced, read_corpus, token_segments
from app.training.dp_soft_prompt import DPSoftPromptConfig, train_dp_soft_prompt
from app.training.soft_prompt import (
    SoftPromptConfig,
    private_prefix_loss,
    train_soft_prompt,
)
from bench.cells import run_cells
from bench.plotting import pyplot

RESULTS = Path(__file__).parent / "results" / "dp-soft-prompt.json"
IMAGE = Path(__file__).parents[1] / "docs" / "img" / "dp-soft-prompt.png"
TENANT_DATA, EVALUATION = "austen-prideprejudice", "austen-emma"
PROJECTION, SHIPPED = "smollm2-k72-noise-aware", "smollm2-k72-n4-mu50"
MU, BITS, PREFIX, CONTINUATION = 50.0, 4, 32, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="expected examples per logical step")
    parser.add_argument("--physical-batch-size", type=int, default=8)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--evaluation-segments", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()

    settings = ServerSettings()
    runner = ModelRunner.load(settings.model, settings.cache_dir)
    published = load_projection(settings.projection_dir / PROJECTION)
    projection = published.projection
    text = read_corpus(TENANT_DATA, settings.data_dir)
    evaluation = evenly_spaced(token_segments(read_corpus(EVALUATION, settings.data_dir), runner.tokenizer,
                                              PREFIX + CONTINUATION), args.evaluation_segments)
    base = dict(projection_id=published.id, bits=BITS, mu=MU,
                data=TENANT_DATA, steps=args.steps, batch_size=args.batch_size, lr=args.lr, prefix_tokens=PREFIX,
                continuation_tokens=CONTINUATION)
    reference = SoftPromptConfig(name="reference", **base)

    def perplexity(prompt: torch.Tensor | None) -> float:
        loss = private_prefix_loss(runner, projection, reference, prompt)
        return math.exp(held_out_loss(loss, evaluation, 8, seed=0))

    def trained(epsilon: float | None) -> dict:
        with tempfile.TemporaryDirectory() as out:
            if epsilon is None:
                manifest = train_soft_prompt(runner, projection, SoftPromptConfig(name="plain", **base), text, Path(out))
            else:
                config = DPSoftPromptConfig(name="dp", tenant="bench", target_epsilon=epsilon, delta=1e-5,
                                            physical_batch_size=args.physical_batch_size, **base)
                manifest = train_dp_soft_prompt(runner, projection, config, text, Path(out))
            prompt = load_soft_prompt(Path(out) / manifest["config"]["name"]).embeddings
        return {"perplexity": perplexity(prompt), "train_loss_curve": manifest["loss_curve"],
                "dp": manifest.get("dp"), "train_segments": manifest["train_segments"]}

    cells = [("no soft prompt", lambda: {"perplexity": perplexity(None)}),
             ("shipped WikiText-2 soft prompt", lambda: {"perplexity": perplexity(
                 load_soft_prompt(settings.soft_prompt_dir / SHIPPED).embeddings)}),
             ("non-private", lambda: trained(None))]
    cells += [(f"DP epsilon={eps:g}", lambda eps=eps: trained(eps)) for eps in args.epsilons]
    plan = {**{k: v for k, v in vars(args).items() if k != "fresh"}, "model": settings.model,
            "tenant_data": TENANT_DATA, "evaluation": EVALUATION}
    results = run_cells(RESULTS, plan, cells, fresh=args.fresh, desc="dp-soft-prompt")

    print(f"\n{settings.model}: soft prompts trained on {TENANT_DATA} ({args.steps} steps, expected batch "
          f"{args.batch_size}), perplexity on {args.evaluation_segments} {EVALUATION} segments ({PREFIX}-token "
          f"private prefix at mu={MU:g}, n={BITS}; {CONTINUATION}-token continuation)\n")
    print("| soft prompt | held-out perplexity | epsilon (delta 1e-5) | noise multiplier | sampling rate |")
    print("|---|---|---|---|---|")
    for key, cell in results["cells"].items():
        dp = cell.get("dp")
        columns = (f"{dp['epsilon']:.3g} | {dp['noise_multiplier']:.3g} | {dp['sample_rate']:.3g}" if dp
                   else "none | - | -")
        print(f"| {key} | {cell['perplexity']:.2f} | {columns} |")
    plot(results)


def plot(results: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    cells = results["cells"]
    private = [(c["dp"]["epsilon"], c["perplexity"]) for c in cells.values() if c.get("dp")]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*private), marker="o", label="DP-SGD soft prompt")
    for key, style in (("non-private", "--"), ("no soft prompt", ":"), ("shipped WikiText-2 soft prompt", "-.")):
        ax.axhline(cells[key]["perplexity"], color="black", linestyle=style, linewidth=1, label=key)
    ax.set_xscale("log")
    ax.set_xlabel("training epsilon (delta 1e-5)")
    ax.set_ylabel("perplexity on Emma (held out)")
    ax.set_title("soft prompts trained on Pride and Prejudice", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    IMAGE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGE, dpi=110)
    print(f"plot: {IMAGE}")


if __name__ == "__main__":
    main()
