"""Server-side cost of privacy on the default model: the privacy path against the model's own work, and what the
soft prompt's key/value cache saves.

    python -m bench.server [--repeats 10] [--prompt-tokens 64] [--new-tokens 32] [--virtual-tokens 32 100]

In one run, on one prompt: the privacy path (wire decode, dequantize, reconstruct, select the soft
prompt) against one forward pass over the prompt and a greedy generation from it; and the whole
private request against plain `model.generate` on the same token ids. Then, for soft prompts of each
--virtual-tokens length, the prefill (the forward pass up to the first new token) per request with the
soft prompt's keys and values cached against running the soft prompt with every request, alone and in
a batch of --batch. Prints tables and writes bench/results/server.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from app.engine.prefix_cache import compute_prefix
from app.engine.request import EngineRequest, GenerationParams, SoftPromptPrefix
from app.engine.transformers import decode
from app.model_runner import ModelRunner
from app.service import InferenceService
from app.settings import ServerSettings
from client_sdk.bundle import load_projected_table
from client_sdk.mechanism import MechanismParams
from client_sdk.privatize import privatize_tokens

RESULTS = Path(__file__).parent / "results" / "server.json"
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
        "in Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel "
        "Tower surpassed the Washington Monument to become the tallest man-made structure in the world, a title "
        "it held for 41 years until the Chrysler Building in New York City was finished in 1930.")


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_seconds(first, second, repeats: int) -> tuple[list[float], list[float]]:
    """Times of `first` and `second`, alternated (this machine's load drifts: each pair sees about the same)."""
    first(), second()  # warm up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


def kv_cache_rows(runner: ModelRunner, prompt: torch.Tensor, virtual_tokens: list[int], batches: list[int],
                  repeats: int) -> list[dict]:
    """Prefill per request with the soft prompt's cached keys and values against without, per length and batch:
    medians, and the mean of the paired differences with its standard error."""
    rows = []
    for m in virtual_tokens:
        rows_of_e = torch.randint(runner.input_embeddings.shape[0], (m,), generator=torch.Generator().manual_seed(m))
        soft = runner.input_embeddings[rows_of_e].detach().clone()  # what a soft prompt initialised from text is
        prefix = compute_prefix(runner.model, soft)
        once = median_seconds(lambda: compute_prefix(runner.model, soft), repeats)
        for batch in batches:
            first_token = GenerationParams(max_new_tokens=1)
            cached = [EngineRequest(SoftPromptPrefix("bench", soft), prompt, first_token) for _ in range(batch)]
            full = [EngineRequest(None, torch.cat([soft, prompt]), first_token) for _ in range(batch)]
            without, with_cache = paired_seconds(lambda: decode(runner, full), lambda: decode(runner, cached, prefix),
                                                 repeats)
            saved = [(a - b) / batch for a, b in zip(without, with_cache)]
            rows.append({"virtual_tokens": m, "batch": batch,
                         "prefill_without_cache": statistics.median(without) / batch,
                         "prefill_with_cache": statistics.median(with_cache) / batch,
                         "saved_mean": statistics.mean(saved),
                         "saved_standard_error": statistics.stdev(saved) / len(saved) ** 0.5,
                         "saved_share_of_medians": 1 - statistics.median(with_cache) / statistics.median(without),
                         "cache_compute_once": once})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--mu", type=float, default=50.0)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--virtual-tokens", type=int, nargs="+", default=[32, 100])
    parser.add_argument("--batch", type=int, default=8, help="the batched rows of the KV-cache table")
    args = parser.parse_args()

    settings = ServerSettings()
    runner = ModelRunner.load(settings.model, settings.cache_dir)
    service = InferenceService(runner, settings)
    published = next(iter(service.catalog.projections.values()))
    table = load_projected_table(published.table_bytes)

    ids = runner.tokenizer(TEXT).input_ids[: args.prompt_tokens]
    params = MechanismParams.from_mu(args.mu, bits=args.bits, dim=published.projection.dim,
                                     clip=published.projection.clip)
    body = privatize_tokens(np.asarray(ids), table, params, published.id)
    prepared = service.prepare(body)
    gen = GenerationParams(max_new_tokens=args.new_tokens)
    # the same number of new tokens on both sides: no early stop at EOS
    runner.model.generation_config.eos_token_id = None
    plain_ids = torch.tensor([ids])

    def forward() -> None:
        with torch.inference_mode():
            runner.model(inputs_embeds=prepared.embeddings[None])

    def plain_generate() -> None:
        with torch.inference_mode():
            runner.model.generate(plain_ids, attention_mask=torch.ones_like(plain_ids), max_new_tokens=args.new_tokens,
                                  do_sample=False, pad_token_id=runner.tokenizer.eos_token_id)

    def private_request() -> None:
        service.generate(service.prepare(body), gen)

    privacy = median_seconds(lambda: service.prepare(body), args.repeats * 10)
    rows = {
        "privacy path (decode + dequantize + reconstruct + select the soft prompt)": privacy,
        "model forward over the prompt": median_seconds(forward, args.repeats),
        f"private request (privacy path + generate {args.new_tokens} tokens)": median_seconds(private_request,
                                                                                             args.repeats),
        f"plain model.generate, same {len(ids)} token ids": median_seconds(plain_generate, args.repeats),
    }
    request = rows[f"private request (privacy path + generate {args.new_tokens} tokens)"]
    plain = rows[f"plain model.generate, same {len(ids)} token ids"]
    print(f"model {runner.model_id}, prompt {len(ids)} tokens, {args.new_tokens} new tokens, n={args.bits}, "
          f"k={params.dim}, mu={args.mu}, {torch.get_num_threads()} threads")
    for name, seconds in rows.items():
        print(f"{name:<70} {seconds * 1e3:>9.2f} ms")
    summary = {
        "privacy_path_share_of_request": privacy / request,
        "private_over_plain_latency": request / plain,
        "private_tokens_per_second": args.new_tokens / request,
        "plain_tokens_per_second": args.new_tokens / plain,
    }
    print(f"privacy path share of a request: {summary['privacy_path_share_of_request']:.3%}")
    print(f"private request / plain generate latency: {summary['private_over_plain_latency']:.3f}x "
          f"({summary['private_tokens_per_second']:.1f} vs {summary['plain_tokens_per_second']:.1f} tokens/s)")
    kv = kv_cache_rows(runner, prepared.embeddings, args.virtual_tokens, sorted({1, args.batch}), args.repeats)
    print(f"\nsoft-prompt KV cache: prefill per request ({len(ids)}-token prompt), {args.repeats} alternated pairs")
    print("| virtual tokens | batch | without cache ms | with cache ms | saved ms (mean +- s.e.) | saved (medians) | "
          "cache computed once ms |")
    print("|---|---|---|---|---|---|---|")
    for row in kv:
        print(f"| {row['virtual_tokens']} | {row['batch']} | {row['prefill_without_cache'] * 1e3:.1f} | "
              f"{row['prefill_with_cache'] * 1e3:.1f} | {row['saved_mean'] * 1e3:.1f} +- "
              f"{row['saved_standard_error'] * 1e3:.1f} | {row['saved_share_of_medians']:.0%} | "
              f"{row['cache_compute_once'] * 1e3:.1f} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "args": vars(args),
                                   "seconds": rows, **summary, "kv_cache": kv}, indent=2))


if __name__ == "__main__":
    main()
