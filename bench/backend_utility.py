"""Do the evaluation's utility figures carry over to the llama.cpp backend? Perplexities on the held-out novel through
llama.cpp against transformers, on the same payloads.

    python -m bench.backend_utility [--corpus austen-emma] [--segments 16] [--levels 4:5 4:10]

The evaluation's sample (bench/pipeline.py: 64-token prefixes sent through the client's and the server's path,
64-token continuations scored after them) and its rows (bench/privacy_utility.py): selective privacy (only the
private-span tokens noised, the rest sent clean) and DEL + the soft prompt the server would serve at that level,
each scored by transformers (the model the artifacts were trained on, `segment_nlls`) and by llama.cpp on the GGUF
(every position's logits of the soft prompt, prefix and continuation run as embeddings). Prints the perplexities,
their ratio (llama.cpp / transformers) and the mean per-segment NLL difference with its standard error; writes
bench/results/backend-utility.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch

from app.engine.llamacpp import LlamaCppModel
from app.model_runner import ModelRunner, gguf_path
from app.provenance import package_versions
from app.reconstruction import load_projection
from app.settings import ServerSettings
from app.soft_prompts import load_soft_prompts, select_soft_prompt
from bench.pipeline import Sample, load_sample, segment_nlls
from bench.privacy_utility import TRAINED_PROJECTION, Bench, Plan

RESULTS = Path(__file__).parent / "results" / "backend-utility.json"


def llamacpp_nlls(model: LlamaCppModel, table: torch.Tensor, prefixes: torch.Tensor, sample: Sample,
                  soft: torch.Tensor | None) -> np.ndarray:
    """Per-segment mean NLL of each continuation after its prefix (and the soft prompt), through llama.cpp."""
    nlls = []
    for prefix, continuation in zip(prefixes, sample.continuations):
        inputs = torch.cat([*([soft] if soft is not None else []), prefix, table[continuation[:-1]]])
        logits = torch.from_numpy(model.score(inputs.to(torch.float32).numpy()))
        scored = logits[len(inputs) - len(continuation):]  # the positions that predict the continuation
        nlls.append(float(torch.nn.functional.cross_entropy(scored, continuation)))
    return np.array(nlls)


def served_soft_prompt(bench: Bench, bits: int, mu: float) -> tuple[str, torch.Tensor]:
    """The soft prompt the server would serve at this level."""
    served, _ = select_soft_prompt(bench.soft_prompts, bench.published.id, bits, mu)
    if served is None:
        raise SystemExit(f"no served soft prompt for projection {bench.published.id} at n={bits}, mu={mu:g}")
    return served.name, served.embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="austen-emma")
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--levels", nargs="+", default=["4:5", "4:10"], help="n:mu")
    parser.add_argument("--threads", type=int, help="torch's and llama.cpp's threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ServerSettings()
    runner = ModelRunner.load(settings.model, settings.cache_dir)
    levels = tuple((int(b), float(m)) for b, m in (level.split(":") for level in args.levels))
    plan = Plan(corpora=(args.corpus,), segments=args.segments, attack_segments=0, levels=levels, beam=0,
                chat_prompts=0, chat_tokens=0, audit_samples=0, search_steps=0)
    sample = load_sample(runner.tokenizer, args.corpus, settings.data_dir, args.segments)
    bench = Bench(runner, [sample], load_projection(settings.projection_dir / TRAINED_PROJECTION),
                  load_soft_prompts(settings.soft_prompt_dir, runner)[0],
                  encoder=None, clip=settings.clip, plan=plan, prior_ids=np.zeros(1, dtype=np.int64), chat_prompts=[])
    longest = 256 + 2 * sample.prefix_ids.shape[1]
    model = LlamaCppModel(gguf_path(runner.model_id), n_ctx=longest, n_seq=1, threads=args.threads)
    table = bench.table
    rows = []
    for bits, mu in levels:
        soft_name, soft = served_soft_prompt(bench, bits, mu)
        for row, prefixes, prompt in [("selective", bench.selective_prefix(sample, bits, mu), None),
                                      ("del + served soft prompt", bench.del_prefix(sample, bits, mu), soft)]:
            inputs = prefixes if prompt is None else torch.cat([prompt.expand(len(prefixes), -1, -1), prefixes], 1)
            theirs = segment_nlls(runner.model, inputs, sample.continuations)
            ours = llamacpp_nlls(model, table, prefixes, sample, prompt)
            difference = ours - theirs
            rows.append({"row": row, "bits": bits, "mu": mu, "soft_prompt": soft_name if prompt is not None else None,
                         "perplexity_transformers": math.exp(theirs.mean()),
                         "perplexity_llamacpp": math.exp(ours.mean()),
                         "ratio": math.exp(ours.mean() - theirs.mean()),
                         "nll_difference_mean": float(difference.mean()),
                         "nll_difference_se": statistics.stdev(difference) / len(difference) ** 0.5,
                         "nll_transformers": theirs.tolist(), "nll_llamacpp": ours.tolist()})
    model.close()
    print(f"\n{args.corpus}, {args.segments} segments of 64 + 64 tokens, trained projection k=72\n")
    print("| row | n | mu | soft prompt | perplexity transformers | perplexity llama.cpp | llama.cpp / transformers "
          "| NLL difference (mean +- s.e.) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['bits']} | {r['mu']:g} | {r['soft_prompt'] or '-'} | "
              f"{r['perplexity_transformers']:.2f} | {r['perplexity_llamacpp']:.2f} | {r['ratio']:.4f} | "
              f"{r['nll_difference_mean']:+.4f} +- {r['nll_difference_se']:.4f} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "versions": package_versions(),
                                   "base_model_sha256": runner.fingerprint, "projection_id": bench.published.id,
                                   "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
