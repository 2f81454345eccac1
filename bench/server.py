"""Server-side cost of privacy on the default model: the privacy path against the model's own work.

    python -m bench.server [--repeats 10] [--prompt-tokens 64] [--new-tokens 32]

In one run, on one prompt: the privacy path (wire decode, dequantize, reconstruct, prepend the soft
prompt) against one forward pass over the prompt and a greedy generation from it; and the whole
private request against plain `model.generate` on the same token ids. Prints a table and writes
bench/results/server.json.
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

from app.model_runner import GenerationParams, ModelRunner
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--mu", type=float, default=50.0)
    parser.add_argument("--bits", type=int, default=4)
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
        "privacy path (decode + dequantize + reconstruct + prepend)": privacy,
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
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "args": vars(args),
                                   "seconds": rows, **summary}, indent=2))


if __name__ == "__main__":
    main()
