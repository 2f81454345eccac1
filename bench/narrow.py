"""Narrower projections (issue 25, item 1): does a projection of small k, trained noise-aware at the target mu, let
the wholly private path carry the prompt where k = 72 does not?

    python -m bench.narrow --projection DIR [DIR ...] [--mu 5 10] [--segments 16] [--corpus austen-emma]

For each projection artifact (a folder as `veil train projection` writes it; the shipped k = 72 one is
projections/smollm2-k72-noise-aware) and each mu at n = 4, WITHOUT a soft prompt: the continuation's NLL after the
DEL prefix and after another segment's DEL prefix (the mismatched control), as bench.privacy_utility scores the `del`
row, and context retained against the mismatched control and against sending nothing, with bootstrap SEs over
segments. At a fixed mu the noise per coordinate grows with k, so a narrow projection trades width for signal.
Attacks: the per-token ones (nearest neighbour, maximum likelihood, maximum likelihood with the unigram prior), not
the beam. Resumable: writes <out>/narrow-projections.json cell by cell with the commands, package versions and each
projection's training config; a later run with other projections adds to it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from app.artifacts import read_manifest
from app.model_runner import ModelRunner
from app.provenance import package_versions
from app.reconstruction import load_projection
from app.settings import ServerSettings
from app.training.data import read_corpus
from bench.cells import Cell, run_cells
from bench.pipeline import load_sample
from bench.privacy_utility import PRIOR_CORPORA, Bench, Plan, level_key
from bench.privacy_utility_report import perplexity, retained, strongest

RESULTS = Path(__file__).parent / "results"
BITS = 4


def measure(runner: ModelRunner, projections: list[Path], mus: list[float], corpus: str, segments: int,
            settings: ServerSettings, path: Path, command: str) -> dict:
    """The floors, then each projection's `del` row and per-token attacks at each mu: cells saved one by one in
    `path`, so later runs add projections (a projection is keyed by its name and id)."""
    sample = load_sample(runner.tokenizer, corpus, settings.data_dir, segments)
    prior_text = "\n".join(read_corpus(name, settings.data_dir) for name in PRIOR_CORPORA)
    prior_ids = np.array(runner.tokenizer(prior_text, add_special_tokens=False)["input_ids"])
    plan = Plan(corpora=(corpus,), segments=segments, attack_segments=0, levels=tuple((BITS, mu) for mu in mus),
                beam=0, chat_prompts=0, chat_tokens=0, audit_samples=0, search_steps=0)
    saved = json.loads(path.read_text()) if path.exists() else {}
    about = {"corpus": corpus, "sha256": sample.sha256, "model": runner.model_id, "versions": package_versions(),
             "commands": sorted(set(saved.get("commands", [])) | {command}), "projections": saved.get("projections", {})}
    cells: list[Cell] = []
    for directory in projections:
        published, manifest = load_projection(directory), read_manifest(directory)
        bench = Bench(runner, [sample], published, [], encoder=None, clip=published.projection.clip, plan=plan,
                      prior_ids=prior_ids, chat_prompts=[])
        name = f"{directory.name}@{published.id}"
        about["projections"][name] = {"dim": published.projection.dim, "config": manifest["config"],
                                      "held_out_loss": manifest.get("held_out_loss"),
                                      "held_out_loss_pca": manifest.get("held_out_loss_pca")}
        if not cells:
            cells += [(f"floor/{f}", lambda b=bench, f=f: b.floor(corpus, f)) for f in ("clean", "nothing")]
        for mu in mus:
            cells.append((f"{name}/{level_key(BITS, mu)}",
                          lambda b=bench, m=mu: {**b.row(corpus, "del", BITS, m), **b.del_attacks(corpus, BITS, m)}))
    return run_cells(path, {"corpus": corpus, "segments": segments, "bits": BITS}, cells, desc="narrow",
                     metadata=about)


def render(results: dict) -> str:
    """The markdown table: one row per projection and mu, from the saved cells."""
    cells, clean, nothing = results["cells"], results["cells"]["floor/clean"], results["cells"]["floor/nothing"]
    lines = [f"Held-out {results['corpus']}, {results['plan']['segments']} segments, n = {BITS}, no soft prompt. "
             f"Clean perplexity {perplexity(clean['nll'])[0]:.1f}, nothing sent {perplexity(nothing['nll'])[0]:.1f}.",
             "", "| projection | k | trained at mu | steps | mu | perplexity | retained vs mismatched | "
             "retained vs nothing | strongest per-token attack (all tokens) |", "|---|---|---|---|---|---|---|---|---|"]
    rows = [(*key.split("/", 1), cell) for key, cell in cells.items() if not key.startswith("floor/")]
    by_level = lambda row: (float(row[1].split("mu")[1]), results["projections"][row[0]]["dim"], row[0])  # noqa: E731
    for name, level, cell in sorted(rows, key=by_level):
        about = results["projections"][name]
        config = about["config"]
        trained = (f"{config['mu_min']:g}" if config["mu_min"] == config["mu_max"]
                   else f"{config['mu_min']:g}-{config['mu_max']:g}") if config["noise_aware"] else "noise-free"
        ppl, ppl_se = perplexity(cell["nll"])
        mis, mis_se = retained(cell["nll"], cell["nll_mismatched"], clean["nll"])
        nth, nth_se = retained(cell["nll"], nothing["nll"], clean["nll"])
        rate, se, attack = strongest(cell, "all")
        lines.append(f"| {name.split('@')[0]} | {about['dim']} | {trained} | {config['steps']} | "
                     f"{level.split('mu')[1]} | {ppl:.1f} ± {ppl_se:.1f} | {mis:+.3f} ± {mis_se:.3f} | "
                     f"{nth:+.3f} ± {nth_se:.3f} | {rate:.3f} ± {se:.3f} ({attack}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--projection", nargs="+", type=Path, required=True, help="projection artifact folders")
    parser.add_argument("--mu", nargs="+", type=float, default=[5.0, 10.0])
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--corpus", default="austen-emma", help="the held-out text (default: Emma)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ServerSettings()
    runner = ModelRunner.load(settings.model, settings.cache_dir)
    command = "python -m bench.narrow " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = measure(runner, args.projection, args.mu, args.corpus, args.segments, settings,
                      args.out / "narrow-projections.json", command)
    print(render(results))


if __name__ == "__main__":
    main()
