"""Selective privacy on prose with real names: only the names private, against the whole prefix private.

    python -m bench.selective [--segments 32] [--mu 2 4]

Emma (the held-out Austen novel), evenly spaced 64-token prefix + 64-token continuation segments, SmolLM2-135M,
the shipped noise-aware projection (k = 72), n = 4, no soft prompt (the server prepends none to a prompt with public
spans). The private tokens are the names of Emma's characters and places (a list built here, every token of each
name). For each mu the prefix reaches the model as:
- clean (no privacy), and nothing at all (a start token): the two ends of the scale;
- names private: public tokens embedded as they are, the names' tokens through the client's mechanism and the
  server's decoder;
- names private, mismatched control: the names' positions filled with another segment's reconstructed tokens;
- names as a public placeholder word (" someone"): the placeholder treatment, nothing private sent;
- the whole prefix private.
Perplexity of the continuation (and the share of the clean prefix's gain kept), and the attacks' recovery rate on
the private tokens only: maximum likelihood (uniform prior) and a context attack that knows the public tokens and
decodes each private token by the model's prior given the true context plus the likelihood of its levels.
Prints a table and writes bench/results/selective.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from app.model_runner import ModelRunner
from app.provenance import package_versions
from app.reconstruction import load_projection
from app.settings import ServerSettings
from app.training.data import evenly_spaced, read_corpus, token_segments
from app.training.evaluate import start_prefix
from bench.attacks import likelihood_terms, log_likelihoods, maximum_likelihood, recovery_rate
from bench.pipeline import CONTINUATION, PREFIX, reconstruct, segment_nlls, send, start_token
from client_sdk.accounting import privacy_report
from client_sdk.bundle import load_projected_table
from client_sdk.mechanism import MechanismParams

RESULTS = Path(__file__).parent / "results" / "selective.json"
PROJECTION = "smollm2-k72-noise-aware"
NAMES = ["Emma", "Woodhouse", "Knightley", "Harriet", "Smith", "Elton", "Weston", "Churchill", "Frank", "Jane",
         "Fairfax", "Bates", "Martin", "Highbury", "Hartfield", "Randalls", "Donwell", "Taylor", "Perry", "Cole",
         "Goddard", "Isabella", "John", "Enscombe", "Maple Grove", "Suckling", "Dixon", "Campbell", "Robert",
         "Augusta", "Hawkins", "London", "Bath", "Richmond", "Box Hill", "Abbey", "Mill Farm", "Ford", "Larkins",
         "Hetty", "Henry", "George", "Otway", "Wingfield", "Brunswick Square", "Surry", "Kingston", "Ireland"]
PLACEHOLDER = " someone"


def mean_nll(model, prefixes: torch.Tensor, continuations: torch.Tensor) -> float:
    """The continuation's NLL per token after the prefixes, averaged over the segments."""
    return float(segment_nlls(model, prefixes, continuations).mean())


def name_mask(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """True at every token of a listed name (as the tokenizer writes it after a space or at a start)."""
    patterns = {tuple(tokenizer.encode(prefix + name, add_special_tokens=False)) for name in NAMES for prefix in (" ", "")}
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        for t in range(len(row)):
            for pattern in patterns:
                if tuple(row[t : t + len(pattern)]) == pattern:
                    mask[b, t : t + len(pattern)] = True
    return mask


def context_attack(levels: np.ndarray, ids: torch.Tensor, mask: torch.Tensor, client_table: np.ndarray,
                   params: MechanismParams, model, start_id: int) -> np.ndarray:
    """Guesses for the private tokens: public tokens as sent, each private one the argmax of the model's prior
    (given the context so far, guesses included) plus the log-likelihood of its levels."""
    terms = likelihood_terms(client_table, params)
    current = torch.full((ids.shape[0], 1), start_id, dtype=torch.long)
    past, guesses = None, torch.zeros_like(ids)
    with torch.inference_mode():
        for t in range(ids.shape[1]):
            out = model(input_ids=current, past_key_values=past, use_cache=True)
            past = out.past_key_values
            scores = torch.log_softmax(out.logits[:, -1].double(), dim=-1).numpy() + log_likelihoods(levels[:, t], terms)
            guess = torch.from_numpy(np.argmax(scores, axis=1))
            guesses[:, t] = torch.where(mask[:, t], guess, ids[:, t])
            current = guesses[:, t : t + 1]
    return guesses[mask].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--segments", type=int, default=32)
    parser.add_argument("--mu", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = ServerSettings()
    runner = ModelRunner.load(settings.model, settings.cache_dir)
    model, table = runner.model, runner.input_embeddings.detach()
    tokens = token_segments(read_corpus("austen-emma", settings.data_dir), runner.tokenizer, PREFIX + CONTINUATION)
    sample = evenly_spaced(tokens, args.segments)
    prefix_ids, continuations = sample[:, :PREFIX], sample[:, PREFIX:]
    mask = name_mask(prefix_ids, runner.tokenizer)
    published = load_projection(settings.projection_dir / PROJECTION)
    projection, client_table = published.projection, load_projected_table(published.table_bytes)
    placeholder = runner.tokenizer.encode(PLACEHOLDER, add_special_tokens=False)[0]
    start_id, started = start_token(runner.tokenizer), time.perf_counter()
    clean = table[prefix_ids]
    nll = {"clean prefix": mean_nll(model, clean, continuations),
           "nothing sent": mean_nll(model, start_prefix(model, start_id, len(continuations)), continuations),
           "names as a public placeholder word": mean_nll(model, torch.where(mask[..., None], table[placeholder], clean),
                                                          continuations)}
    rows = []
    for mu in args.mu:
        params = MechanismParams.from_mu(mu, bits=4, dim=72, clip=projection.clip)
        levels = send(client_table, prefix_ids, params, args.seed)
        noised = reconstruct(projection, levels, params).to(clean.dtype)
        report = privacy_report(params, 1)
        rows.append({
            "mu": mu, "epsilon_per_token": report.epsilon_per_token,
            "names private": mean_nll(model, torch.where(mask[..., None], noised, clean), continuations),
            "names private, mismatched control": mean_nll(
                model, torch.where(mask[..., None], noised.roll(1, 0), clean), continuations),
            "whole prefix private": mean_nll(model, noised, continuations),
            "attack on the names: maximum likelihood": recovery_rate(
                maximum_likelihood(levels[mask.numpy()], client_table, params), prefix_ids[mask].numpy()),
            "attack on the names: context + likelihood": recovery_rate(
                context_attack(levels, prefix_ids, mask, client_table, params, model, start_id), prefix_ids[mask].numpy()),
        })
        print(f"mu={mu:g} done ({time.perf_counter() - started:.0f} s)", flush=True)

    def cell(value: float) -> str:
        kept = (nll["nothing sent"] - value) / (nll["nothing sent"] - nll["clean prefix"])
        return f"{math.exp(value):.1f} ({kept:+.2f})"

    share = float(mask.float().mean())
    print(f"\nSmolLM2-135M, Emma (held out), {len(continuations)} segments of {PREFIX}+{CONTINUATION} tokens, n=4, k=72, "
          f"no soft prompt; {share:.1%} of prefix tokens are names; perplexity (share of the clean prefix's gain kept)\n")
    print("| row | " + " | ".join(f"mu={r['mu']:g} (eps {r['epsilon_per_token']:.3g}/token)" for r in rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for label, value in nll.items():
        print(f"| {label} | " + " | ".join(cell(value) for _ in rows) + " |")
    for label in ("names private", "names private, mismatched control", "whole prefix private"):
        print(f"| {label} | " + " | ".join(cell(r[label]) for r in rows) + " |")
    for label in [k for k in rows[0] if k.startswith("attack")]:
        print(f"| {label} (of {int(mask.sum())} private tokens) | " + " | ".join(f"{r[label]:.1%}" for r in rows) + " |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"command": f"veil bench selective --segments {args.segments} --mu "
                                              + " ".join(f"{m:g}" for m in args.mu),
                                   "base_model_sha256": runner.fingerprint, "projection_id": published.id,
                                   "versions": package_versions(),
                                   "segments": len(continuations), "private_share": share,
                                   "private_tokens": int(mask.sum()), "nll": nll, "rows": rows,
                                   "seconds": time.perf_counter() - started}, indent=2) + "\n")


if __name__ == "__main__":
    main()
