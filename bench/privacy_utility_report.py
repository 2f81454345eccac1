"""Rendering a privacy-utility run (bench/privacy_utility.py's JSON) as markdown tables and matplotlib plots."""

from __future__ import annotations

import math
from pathlib import Path

from bench.pipeline import PREFIX
from bench.plotting import pyplot

FLOORS = {"clean": "clean prefix (no privacy)", "nothing": "sending nothing", "random": "random prefix"}
ROW_NAMES = {"gaussian": "Gaussian on full embeddings (fp32 on the wire)",
             "gaussian-quantized": "Gaussian on full embeddings, rounded to n bits",
             "del-pca": "DEL, PCA projection",
             "del-trained": "DEL, trained projection",
             "del-trained-sp": "DEL, trained projection + soft prompt"}
ATTACKS = {"nearest-neighbour": "nearest neighbour (paper)", "maximum-likelihood": "maximum likelihood"}


def _retained(cells: dict, nll: float) -> float:
    nothing, clean = cells["nothing"]["nll"], cells["clean"]["nll"]
    return (nothing - nll) / (nothing - clean)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _eps(value: float) -> str:
    return f"{value:.3g}" if value < 1e4 else f"{value:.2e}"


def render(results: dict) -> str:
    """Every table of the run, in markdown."""
    plan, cells = results["plan"], results["cells"]
    mus, bits = plan["mus"], plan["bits"]
    mu_header = [f"mu={mu:g}" for mu in mus]
    out = [f"{results['model']}, WikiText-2 test, {plan['segments']} segments (64-token private prefix, 64-token "
           f"continuation), k={results['dim']}, c={results['clip']:g}, COH over {plan['new_tokens']} greedy tokens, delta=1e-5, seed {plan['seed']}; "
           f"{results['seconds'] / 60:.0f} min of compute. Gaussian rows clip to L2 norm "
           f"C={results.get('gaussian_bound', float('nan')):.3g} (the median token-embedding norm), sigma = 2C/mu.", ""]

    out += ["**Floors and ceiling** (do not depend on the mechanism):", ""]
    out.append(_table(["row", "perplexity", "context retained", "COH"],
                      [[label, f"{math.exp(cells[key]['nll']):.1f}", f"{_retained(cells, cells[key]['nll']):+.2f}",
                        f"{cells[key]['coh']:.3f}"] for key, label in FLOORS.items()]))

    for n in bits:
        out += ["", f"**Utility at n={n}**: perplexity (context retained) / COH", ""]
        rows = []
        for row, label in ROW_NAMES.items():
            values = []
            for mu in mus:
                cell = cells[f"{row}/n{n}/mu{mu:g}"]
                note = "" if row != "del-trained-sp" else \
                    f" [{cell['soft_prompt'] or 'none'}{'' if cell['soft_prompt_exact'] else ', nearest'}]"
                values.append(f"{math.exp(cell['nll']):.1f} ({_retained(cells, cell['nll']):+.2f}) / "
                              f"{cell['coh']:.3f}{note}")
            rows.append([label, *values])
        out.append(_table(["row", *mu_header], rows))

    out += ["", "**Formal privacy**: epsilon at delta=1e-5, per token / per 64-token prompt", ""]
    rows = []
    for n in bits:
        first = [cells[f"del-trained/n{n}/mu{mu:g}"] for mu in mus]
        rows.append([f"DEL n={n}, exact", *[f"{_eps(c['epsilon_per_token'])} / {_eps(c['epsilon_prompt'])}"
                                           for c in first]])
    rows.append(["DEL, the paper's CLT claim (per token)",
                 *[_eps(cells[f"del-trained/n{bits[-1]}/mu{mu:g}"]["epsilon_clt_per_token"]) for mu in mus]])
    rows.append(["Gaussian (exactly mu-GDP)", *[f"{_eps(c['epsilon_per_token'])} / {_eps(c['epsilon_prompt'])}" for c
                                                 in (cells[f"gaussian/n{bits[0]}/mu{mu:g}"] for mu in mus)]])
    out.append(_table(["mechanism", *mu_header], rows))

    floor = cells["attack/lm-prior/alone"]["rate"]
    for n in bits:
        out += ["", f"**Attacks at n={n}**: share of the prompt's tokens the server recovers exactly", ""]
        rows = []
        for row in ("gaussian", "gaussian-quantized", "del-pca", "del-trained"):
            for attack, label in ATTACKS.items():
                rows.append([f"{ROW_NAMES[row]}: {label}",
                             *[f"{cells[f'{row}/n{n}/mu{mu:g}']['attacks'][attack]:.1%}" for mu in mus]])
        rows.append([f"{ROW_NAMES['del-trained']}: maximum likelihood + language-model prior (prior alone: "
                     f"{floor:.1%})", *[f"{cells[f'attack/lm-prior/n{n}/mu{mu:g}']['rate']:.1%}" for mu in mus]])
        out.append(_table(["row: attack", *mu_header], rows))

    out += ["", "**Calibrating mu to an attack** (trained projection): the smallest mu at which the attack recovers "
            "the target share of tokens, searched in log scale over [0.1, 1000]", ""]
    rows = []
    for n in bits:
        for attack, label in ATTACKS.items():
            for target in plan["targets"]:
                found = cells[f"calibrate/{attack}/n{n}/{target:g}"]
                if found["mu"] is None:
                    rows.append([label, str(n), f"{target:.0%}", f"> {found['low']:g} ({found['success']:.1%} there)",
                                 "-", "-"])
                else:
                    rows.append([label, str(n), f"{target:.0%}", f"{found['mu']:.3g}",
                                 _eps(found["epsilon_per_token"]), f"{math.exp(found['nll_with_soft_prompt']):.1f}"])
    out.append(_table(["attack", "n", "target", "mu", "epsilon per token", "perplexity, DEL + soft prompt"], rows))

    out += ["", "**Empirical audit** (one token, worst-case neighbours, Clopper-Pearson 95%): the lower bound must "
            "never exceed the accountant", ""]
    rows = []
    for n in bits:
        for mu in mus:
            a = cells[f"audit/n{n}/mu{mu:g}"]
            rows.append([str(n), f"{mu:g}", _eps(a["epsilon_accountant"]), f"{a['epsilon_lower']:.3g}",
                         f"{a['false_positive_rate']:.2g}", f"{a['false_negative_rate']:.2g}", f"{a['samples']:,}"])
    out.append(_table(["n", "mu", "accountant epsilon", "audit lower bound", "FPR", "FNR", "samples per side"], rows))

    out += ["", f"**Examples**: the first segment's greedy continuation ({plan['new_tokens']} tokens)", ""]
    reference = results.get("reference", "")
    examples = [["reference continuation", reference]] + [[label, cells[key]["example"]] for key, label in FLOORS.items()]
    examples += [[f"{ROW_NAMES['del-trained-sp']}, n={bits[-1]}, mu={mu:g}", cells[f"del-trained-sp/n{bits[-1]}/mu{mu:g}"]
                  ["example"]] for mu in mus]
    out.append(_table(["row", "text"], [[label, _one_line(text)] for label, text in examples]))

    if "communication" in results:
        comm = results["communication"]
        out += ["", f"**Communication** per token (model width b={comm['width']}; DEL payloads encoded for a "
                f"{PREFIX}-token prompt, header included)", ""]
        rows = [["fp32 embeddings", f"{comm['fp32_bytes_per_token']:g}", "1x"],
                ["fp16 embeddings", f"{comm['fp16_bytes_per_token']:g}", "2x"]]
        for n, c in comm["bits"].items():
            per_token = c["payload_bytes"] / c["tokens"]
            rows.append([f"Gaussian rounded to n={n} bits", f"{c['gaussian_quantized_bytes_per_token']:g}",
                         f"{comm['fp32_bytes_per_token'] / c['gaussian_quantized_bytes_per_token']:.0f}x"])
            rows.append([f"DEL n={n}, k={results['dim']} (payload incl. 30-byte header)", f"{per_token:.2f}",
                         f"{comm['fp32_bytes_per_token'] / per_token:.0f}x"])
        out.append(_table(["what is sent", "bytes per token", "saving vs fp32"], rows))
    return "\n".join(out) + "\n"



def plot(results: dict, directory: Path, prefix: str) -> list[Path]:
    """Utility against mu and attacks/audit against mu, one column per n; returns the files written."""
    plt = pyplot()
    if plt is None:
        return []
    plan, cells = results["plan"], results["cells"]
    mus, bits = plan["mus"], plan["bits"]
    directory.mkdir(parents=True, exist_ok=True)

    fig, axes = plt.subplots(2, len(bits), figsize=(5.5 * len(bits), 7.5), squeeze=False)
    for column, n in enumerate(bits):
        for row, (metric, label) in enumerate((("nll", "perplexity (log scale)"), ("coh", "COH"))):
            ax = axes[row][column]
            for key, name in ROW_NAMES.items():
                row_cells = [cells[f"{key}/n{n}/mu{mu:g}"] for mu in mus]
                values = [c[metric] for c in row_cells]
                ax.plot([c["epsilon_per_token"] for c in row_cells], [math.exp(v) for v in values]
                        if metric == "nll" else values, marker="o", label=name)
            for key, style in (("nothing", "--"), ("clean", ":"), ("random", "-.")):
                value = cells[key][metric]
                ax.axhline(math.exp(value) if metric == "nll" else value, color="black", linestyle=style,
                           linewidth=1, label=FLOORS[key])
            ax.set_xscale("log")
            if metric == "nll":
                ax.set_yscale("log")
            ax.set_xlabel("epsilon per token (exact, delta 1e-5; points at mu = " + ", ".join(f"{m:g}" for m in mus)
                          + ")", fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"n={n}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{results['model']}, WikiText-2 test: utility against formal privacy", fontsize=10)
    fig.tight_layout()
    utility_path = directory / f"{prefix}-utility.png"
    fig.savefig(utility_path, dpi=110)

    fig, axes = plt.subplots(1, len(bits) + 1, figsize=(5 * (len(bits) + 1), 4), squeeze=False)
    for column, n in enumerate(bits):
        ax = axes[0][column]
        for row in ("gaussian", "del-pca", "del-trained"):
            for attack, style in (("nearest-neighbour", "--"), ("maximum-likelihood", "-")):
                ax.plot(mus, [cells[f"{row}/n{n}/mu{mu:g}"]["attacks"][attack] for mu in mus], linestyle=style,
                        marker="o", label=f"{ROW_NAMES[row]}: {ATTACKS[attack]}")
        ax.plot(mus, [cells[f"attack/lm-prior/n{n}/mu{mu:g}"]["rate"] for mu in mus], marker="s", color="black",
                label="DEL trained: ML + language-model prior")
        ax.axhline(cells["attack/lm-prior/alone"]["rate"], color="grey", linestyle=":", label="language-model prior alone")
        ax.set_xscale("log")
        ax.set_xlabel("mu per token")
        ax.set_ylabel("tokens recovered exactly")
        ax.set_title(f"attacks, n={n}", fontsize=9)
    axes[0][0].legend(fontsize=6)
    ax = axes[0][-1]
    for n in bits:
        ax.plot(mus, [cells[f"audit/n{n}/mu{mu:g}"]["epsilon_accountant"] for mu in mus], marker="o",
                label=f"accountant (exact), n={n}")
        ax.plot(mus, [cells[f"audit/n{n}/mu{mu:g}"]["epsilon_lower"] for mu in mus], marker="x", linestyle="--",
                label=f"audit lower bound, n={n}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mu per token")
    ax.set_ylabel("epsilon per token (delta 1e-5)")
    ax.set_title("empirical audit vs accountant", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    attacks_path = directory / f"{prefix}-attacks.png"
    fig.savefig(attacks_path, dpi=110)
    plt.close("all")
    return [utility_path, attacks_path]
