"""Client-side cost: microseconds per token for lookup, clip, quantize and pack; bundle size vs fp32 table.

    python -m bench.client [--tokens 256] [--repeats 200]

Prints a table and writes bench/results/client.json. The default vocabulary and width are
SmolLM2-135M's (49152 x 576).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from client_sdk.mechanism import MechanismParams
from client_sdk.privatize import privatize_tokens

RESULTS = Path(__file__).parent / "results" / "client.json"


def time_per_token(table: np.ndarray, params: MechanismParams, tokens: int, repeats: int) -> float:
    """Median over `repeats` prompts of the whole device path, in microseconds per token (fresh OS seed each)."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, table.shape[0], size=(repeats, tokens))
    privatize_tokens(prompts[0], table, params, "00" * 8)  # warm up
    times = []
    for ids in prompts:
        start = time.perf_counter()
        privatize_tokens(ids, table, params, "00" * 8)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / tokens * 1e6


def int8_table_bytes(vocab: int, dim: int) -> int:
    """Size of the projected table as shipped in the bundle: int8 with a per-column fp32 scale (safetensors)."""
    return len(save({"table": np.zeros((vocab, dim), np.int8), "scale": np.ones(dim, np.float32)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="prompt length per timed call")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--width", type=int, default=576, help="the model's embedding width b")
    args = parser.parse_args()

    fp32_table = args.vocab * args.width * 4
    rows = []
    print(f"{'n':>2} {'k':>4} {'us/token':>9} {'bytes/token':>11} {'bundle table':>13} {'vs fp32 table':>13}")
    for dim in (16, 32, 64, 128):
        table = np.random.default_rng(1).normal(scale=0.05, size=(args.vocab, dim)).astype(np.float32)
        bundle = int8_table_bytes(args.vocab, dim)
        for bits in (1, 2, 4, 8):
            params = MechanismParams.from_mu(5.0, bits=bits, dim=dim, clip=0.05)
            us = time_per_token(table, params, args.tokens, args.repeats)
            row = {"bits": bits, "dim": dim, "us_per_token": us, "bytes_per_token": bits * dim / 8,
                   "bundle_table_bytes": bundle, "fp32_table_bytes": fp32_table}
            rows.append(row)
            print(f"{bits:>2} {dim:>4} {us:>9.2f} {bits * dim / 8:>11.1f} {bundle / 2**20:>10.2f} MiB "
                  f"{fp32_table / bundle:>12.1f}x")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "processor": platform.processor(),
                                   "tokens_per_call": args.tokens, "repeats": args.repeats,
                                   "fp32_table_bytes": fp32_table, "rows": rows}, indent=2))
    print(f"full fp32 embedding table: {fp32_table / 2**20:.1f} MiB; results in {RESULTS}")


if __name__ == "__main__":
    main()
