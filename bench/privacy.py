"""Exact privacy against the paper's CLT view and dp-accounting composition, over a grid of mu.

    python -m bench.privacy [--bits 4] [--dim 128] [--clip 0.05] [--tokens 64] [--delta 1e-5]

Prints a markdown table and writes bench/results/privacy.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from client_sdk.accounting import pld, privacy_report
from client_sdk.accounting.gdp import epsilon_for_delta as gdp_epsilon
from client_sdk.mechanism import MechanismParams

RESULTS = Path(__file__).parent / "results" / "privacy.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clip", type=float, default=0.05)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()

    rows = []
    print(f"n={args.bits}, k={args.dim}, c={args.clip}, delta={args.delta:g}, prompt of T={args.tokens} tokens\n")
    print("| mu (CLT) | A | eps/token exact | eps/token CLT | fitted mu | gamma | "
          f"eps T={args.tokens} exact | eps T={args.tokens} CLT | eps T={args.tokens} dp-accounting PLD | PLD s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mu in (0.5, 1, 2, 5, 10, 20, 40, 60):
        params = MechanismParams.from_mu(mu, bits=args.bits, dim=args.dim, clip=args.clip)
        report = privacy_report(params, args.tokens, args.delta)
        start = time.perf_counter()
        composed = pld.composed_epsilon(params.levels * params.dim, params.worst_case_p, args.tokens, args.delta)
        pld_seconds = time.perf_counter() - start
        clt_prompt = gdp_epsilon(report.mu_clt_prompt, args.delta)
        row = {**report.model_dump(), "epsilon_clt_prompt": clt_prompt, "epsilon_pld_prompt": composed,
               "pld_seconds": pld_seconds}
        rows.append(row)
        print(f"| {mu:g} | {params.scale:.4g} | {report.epsilon_per_token:.4g} | {report.epsilon_clt_per_token:.4g} "
              f"| {report.mu_fitted:.4g} | {report.gamma:.3g} | {report.epsilon:.5g} | {clt_prompt:.5g} "
              f"| {composed:.5g} | {pld_seconds:.2f} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
