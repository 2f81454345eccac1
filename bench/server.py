"""Server-side cost of privacy on the default model, per backend: the privacy path against the model's own work,
single-stream tokens/s of each backend, and what the soft prompt's key/value cache saves.

    python -m bench.server [--repeats 10] [--prompt-tokens 64] [--new-tokens 32] [--backends transformers llamacpp]
                           [--threads N] [--virtual-tokens 32 100]

In one run, on one prompt: the privacy path (wire decode, dequantize, reconstruct, select the soft prompt) against
one forward pass over the prompt; the whole private request on each backend (--backends, alternated so that each
round sees the machine's same load), against plain `model.generate` and llama.cpp's own token path on the same
token ids; the backends' tokens/s and their ratio (the ratio of medians, and the mean of the per-round ratios with
its standard error); the privacy path's share of a request on each. Then, for soft prompts of each
--virtual-tokens length (none: skipped), the transformers backend's prefill per request with the soft prompt's keys
and values cached against running the soft prompt with every request, alone and in a batch of --batch. Prints
tables and writes bench/results/server.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from app.engine import llamacpp
from app.engine.prefix_cache import compute_prefix
from app.engine.request import EngineRequest, GenerationParams, SoftPromptPrefix
from app.engine.transformers import decode
from app.model_runner import ModelRunner, gguf_path
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


def alternated_seconds(fns: list, repeats: int) -> list[list[float]]:
    """Times of each of `fns`, run in turn `repeats` times (this machine's load drifts: each round sees about the
    same), after one warm-up call each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
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
            without, with_cache = alternated_seconds([lambda: decode(runner, full),
                                                      lambda: decode(runner, cached, prefix)], repeats)
            saved = [(a - b) / batch for a, b in zip(without, with_cache)]
            rows.append({"virtual_tokens": m, "batch": batch,
                         "prefill_without_cache": statistics.median(without) / batch,
                         "prefill_with_cache": statistics.median(with_cache) / batch,
                         "saved_mean": statistics.mean(saved),
                         "saved_standard_error": statistics.stdev(saved) / len(saved) ** 0.5,
                         "saved_share_of_medians": 1 - statistics.median(with_cache) / statistics.median(without),
                         "cache_compute_once": once})
    return rows


def backend_rows(services: dict[str, InferenceService], bodies: Iterator[bytes], gen: GenerationParams,
                 privacy: float, repeats: int) -> dict[str, dict]:
    """Each backend's private request (privacy path + generation), alternated: median seconds, tokens/s, the
    privacy path's share, and (after the first backend) the first's time over this one's, per round and of medians.
    The same request stopped after its first token, alternated with the rest, gives the time to the first token
    and the decoding rate after it: (new tokens - 1) / (the difference of the medians)."""
    names, first = list(services), dataclasses.replace(gen, max_new_tokens=1)
    fns = [lambda s=services[n], g=g: s.generate(s.prepare(next(bodies)), g) for n in names for g in (gen, first)]
    times = alternated_seconds(fns, repeats)
    baseline = times[0]
    rows = {}
    for name, seconds, to_first in zip(names, times[::2], times[1::2]):
        median, first_token = statistics.median(seconds), statistics.median(to_first)
        row = {"request_seconds": median, "tokens_per_second": gen.max_new_tokens / median,
               "first_token_seconds": first_token,
               "decode_tokens_per_second": (gen.max_new_tokens - 1) / (median - first_token),
               "privacy_path_share_of_request": privacy / median}
        if name != names[0]:
            ratios = [a / b for a, b in zip(baseline, seconds)]
            row[f"speedup_over_{names[0]}"] = statistics.median(baseline) / median
            row[f"speedup_over_{names[0]}_per_round"] = statistics.mean(ratios)
            row[f"speedup_over_{names[0]}_per_round_se"] = statistics.stdev(ratios) / len(ratios) ** 0.5
        rows[name] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--mu", type=float, default=50.0)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--backends", nargs="+", default=["transformers", "llamacpp"],
                        choices=["transformers", "llamacpp"], help="the first is the baseline of the speed-ups")
    parser.add_argument("--threads", type=int, help="CPU threads of both backends (torch and llama.cpp; default: all)")
    parser.add_argument("--virtual-tokens", type=int, nargs="*", default=[32, 100])
    parser.add_argument("--batch", type=int, default=8, help="the batched rows of the KV-cache table")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ServerSettings(threads=args.threads)
    runner = ModelRunner.load(settings.model, settings.cache_dir)
    # the same number of new tokens everywhere: no early stop at EOS (before the backends read the EOS ids)
    runner.model.generation_config.eos_token_id = None
    services = {name: InferenceService(runner, settings.model_copy(update={"backend": name}))
                for name in args.backends}
    service = services[args.backends[0]]
    published = next(iter(service.catalog.projections.values()))
    table = load_projected_table(published.table_bytes)

    ids = runner.tokenizer(TEXT).input_ids[: args.prompt_tokens]
    params = MechanismParams.from_mu(args.mu, bits=args.bits, dim=published.projection.dim,
                                     clip=published.projection.clip)
    body = privatize_tokens(np.asarray(ids), table, params, published.id)
    prepared = service.prepare(body)
    gen = GenerationParams(max_new_tokens=args.new_tokens)
    plain_ids = torch.tensor([ids])

    def forward() -> None:
        with torch.inference_mode():
            runner.model(inputs_embeds=prepared.embeddings[None])

    def plain_generate() -> None:
        with torch.inference_mode():
            runner.model.generate(plain_ids, attention_mask=torch.ones_like(plain_ids), max_new_tokens=args.new_tokens,
                                  do_sample=False, pad_token_id=runner.tokenizer.eos_token_id)

    privacy = median_seconds(lambda: service.prepare(body), args.repeats * 10)
    # every request a fresh payload (new noise), as clients send: the llama.cpp backend reuses the keys of leading
    # rows a prompt shares with recent ones, which a replayed payload would share entirely
    fresh = (privatize_tokens(np.asarray(ids), table, params, published.id) for _ in itertools.count())
    per_backend = backend_rows(services, fresh, gen, privacy, args.repeats)
    rows = {
        "privacy path (decode + dequantize + reconstruct + select the soft prompt)": privacy,
        "model forward over the prompt (transformers)": median_seconds(forward, args.repeats),
        **{f"private request on {name} (privacy path + generate {args.new_tokens} tokens)": row["request_seconds"]
           for name, row in per_backend.items()},
        f"plain model.generate, same {len(ids)} token ids": median_seconds(plain_generate, args.repeats),
    }
    if llamacpp.available():
        plain = llamacpp.LlamaCppModel(gguf_path(runner.model_id), n_ctx=len(ids) + args.new_tokens, n_seq=1,
                                       threads=args.threads)
        rows[f"plain llama.cpp token path, same {len(ids)} token ids"] = median_seconds(
            lambda: plain.greedy(ids, args.new_tokens), args.repeats)
        plain.close()
    print(f"model {runner.model_id}, prompt {len(ids)} tokens, {args.new_tokens} new tokens, n={args.bits}, "
          f"k={params.dim}, mu={args.mu}, {torch.get_num_threads()} torch threads, llama.cpp threads: "
          f"{args.threads or 'all'}")
    for name, seconds in rows.items():
        print(f"{name:<75} {seconds * 1e3:>9.2f} ms")
    baseline = args.backends[0]
    print(f"\n| backend | tokens/s (single stream) | vs {baseline} (medians) | vs {baseline} (per round, mean +- s.e.) "
          "| first token ms | decode tokens/s after it | privacy path share |")
    print("|---|---|---|---|---|---|---|")
    for name, row in per_backend.items():
        speedup = (f"{row[f'speedup_over_{baseline}']:.2f}x | {row[f'speedup_over_{baseline}_per_round']:.2f} +- "
                   f"{row[f'speedup_over_{baseline}_per_round_se']:.2f}x") if name != baseline else "1.00x | -"
        print(f"| {name} | {row['tokens_per_second']:.1f} | {speedup} | {row['first_token_seconds'] * 1e3:.0f} | "
              f"{row['decode_tokens_per_second']:.1f} | {row['privacy_path_share_of_request']:.3%} |")
    summary = {"backends": per_backend, "privacy_path_seconds": privacy}
    kv = kv_cache_rows(runner, prepared.embeddings, args.virtual_tokens, sorted({1, args.batch}), args.repeats)
    if kv:
        print(f"\nsoft-prompt KV cache (transformers): prefill per request ({len(ids)}-token prompt), {args.repeats} "
              "alternated pairs")
        print("| virtual tokens | batch | without cache ms | with cache ms | saved ms (mean +- s.e.) | "
              "saved (medians) | cache computed once ms |")
        print("|---|---|---|---|---|---|---|")
    for row in kv:
        print(f"| {row['virtual_tokens']} | {row['batch']} | {row['prefill_without_cache'] * 1e3:.1f} | "
              f"{row['prefill_with_cache'] * 1e3:.1f} | {row['saved_mean'] * 1e3:.1f} +- "
              f"{row['saved_standard_error'] * 1e3:.1f} | {row['saved_share_of_medians']:.0%} | "
              f"{row['cache_compute_once'] * 1e3:.1f} |")
    for backend in services.values():
        backend.backend.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "args": {**vars(args), "out": str(args.out)},
                                   "seconds": rows, **summary, "kv_cache": kv}, indent=2))

if __name__ == "__main__":
    main()
