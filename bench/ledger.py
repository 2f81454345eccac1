"""The device ledger's charge time with a long history: composed (not added) cumulative accounting.

    python -m bench.ledger [--history 10000] [--charges 200] [--tokens 12]

A ledger holds `history` past prompts of `tokens` private tokens each at the default mechanism (n = 4, k = 72,
c = 2, the default policy's mu), written in one transaction; then `charges` more prompts are charged one by one
under a cumulative cap, timed as the app sees them (`BudgetLedger.reserve`: limits, SQLite IMMEDIATE transaction
with fsync, exact composition of the whole history) and the accounting alone (the history's totals by mechanism
from SQLite, then the cap check). A second ledger mixes two mechanisms (half the history at mu/2): dp-accounting's
PLDs while their supports are small, the dominating binomial beyond (client_sdk.accounting.composition).
Prints a table and writes bench/results/ledger.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from client_sdk.accounting import binomial, composition, privacy_report
from client_sdk.budget import BudgetLedger, Mechanism
from client_sdk.mechanism import MechanismParams
from client_sdk.policy import PrivacyPolicy

RESULTS = Path(__file__).parent / "results" / "ledger.json"


@lru_cache(maxsize=None)
def _report(params: MechanismParams, tokens: int):
    return privacy_report(params, tokens)


def mechanism_of(params: MechanismParams, tokens: int) -> Mechanism:
    return Mechanism(tokens, params.levels * params.dim, params.worst_case_p)


def fill(ledger: BudgetLedger, history: list[tuple[MechanismParams, int]]) -> float:
    """Write past charges directly, in one transaction (reserving them one by one would take minutes of fsyncs);
    returns the sum of their epsilons (basic composition)."""
    rows = []
    for i, (params, tokens) in enumerate(history):
        m, report = mechanism_of(params, tokens), _report(params, tokens)
        rows.append((f"past-{i}", "bench", report.epsilon, report.delta, time.time(), m.tokens, m.trials_per_token, m.p))
    with sqlite3.connect(ledger.path) as db:
        db.executemany("INSERT INTO charges VALUES (?, ?, ?, ?, 'sent', ?, ?, ?, ?)", rows)
    return sum(row[2] for row in rows)


def time_charges(ledger: BudgetLedger, params: MechanismParams, tokens: int, charges: int) -> dict:
    report, mechanism = privacy_report(params, tokens), mechanism_of(params, tokens)
    limits = ledger.limits("bench")
    reserve, accounting = [], []
    for i in range(charges):
        start = time.perf_counter()
        ledger.reserve("bench", f"new-{i}", report.epsilon, report.delta, mechanism)
        reserve.append(time.perf_counter() - start)
        with ledger._transaction() as db:  # the accounting alone: the history's groups, then the cap check
            start = time.perf_counter()
            groups, _, _ = ledger._groups(db, "bench", mechanism)
            composition.fits(groups, limits.total_epsilon, limits.delta)
            accounting.append(time.perf_counter() - start)
    ms = lambda xs: {"p50_ms": float(np.median(xs)) * 1e3, "p95_ms": float(np.percentile(xs, 95)) * 1e3,
                     "max_ms": float(np.max(xs)) * 1e3}
    return {"reserve": ms(reserve), "accounting": ms(accounting), "first_reserve_ms": reserve[0] * 1e3}


def run(history: int, charges: int, tokens: int) -> list[dict]:
    policy = PrivacyPolicy.default()
    params = policy.mechanism(bits=4, dim=72, clip=2.0)
    half = MechanismParams.from_mu(params.mu_clt / 2, bits=4, dim=72, clip=2.0)
    cases = {"one mechanism": [(params, tokens)] * history,
             "two mechanisms": [(params, tokens)] * (history // 2) + [(half, tokens)] * (history // 2)}
    rows = []
    for name, past in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            ledger = BudgetLedger(Path(tmp) / "ledger.db")
            added = fill(ledger, past)
            # a cap that the history and the new charges stay under: twice what everything together would cost
            p_max, trials = composition.dominating_group(composition.as_groups(
                {params.worst_case_p: (history + charges) * tokens * params.levels * params.dim}))
            ledger.set_limits("bench", total_epsilon=2 * binomial.epsilon_for_delta(trials, p_max, 1e-5))
            timing = time_charges(ledger, params, tokens, charges)
            spent = ledger.spent("bench")
            with ledger._transaction() as db:
                groups = ledger._groups(db, "bench")[0]
            method = ("exact binomial" if len(groups) == 1 else
                      "dp-accounting PLD" if composition.pld_affordable(groups) else "dominating binomial (exact)")
        rows.append({"case": f"{name}: {method}", "history": history, "tokens_per_prompt": tokens, "charges": charges, **timing,
                     "composed_epsilon": spent.epsilon, "added_epsilon": added})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history", type=int, default=10_000)
    parser.add_argument("--charges", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=12)
    args = parser.parse_args()
    rows = run(args.history, args.charges, args.tokens)
    print(f"ledger of {args.history} past prompts, {args.tokens} private tokens each; {args.charges} charges timed")
    print(f"{'case':48s} {'reserve p50':>12s} {'p95':>8s} {'max':>8s} {'accounting p50':>15s} {'p95':>8s} {'first':>8s}")
    for r in rows:
        print(f"{r['case']:48s} {r['reserve']['p50_ms']:10.2f}ms {r['reserve']['p95_ms']:6.2f}ms "
              f"{r['reserve']['max_ms']:6.2f}ms {r['accounting']['p50_ms']:13.2f}ms {r['accounting']['p95_ms']:6.2f}ms "
              f"{r['first_reserve_ms']:6.1f}ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": f"veil bench ledger --history {args.history} --charges {args.charges} "
                                              f"--tokens {args.tokens}",
                                   "machine": platform.platform(), "processor": platform.processor(), "rows": rows},
                                  indent=2) + "\n")


if __name__ == "__main__":
    main()
