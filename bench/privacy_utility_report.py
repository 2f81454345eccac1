"""Rendering a privacy-utility run (bench/privacy_utility.py's JSON) as markdown tables and matplotlib plots.

Works on a partial run too: what is not measured yet shows as "-". Every perplexity and context-retained figure
carries its bootstrap SE over segments; a context-retained figure within two SEs of zero is marked "(~0)": the row
is not distinguishable from its reference.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bench.bootstrap import bootstrap_se, within
from bench.pipeline import CONTINUATION, PREFIX
from bench.plotting import pyplot

ROWS = {"del": "DEL (trained projection)",
        "del-sp": "DEL + the served soft prompt",
        "selective": "selective privacy (only private spans noised)",
        "gaussian": "Gaussian on full embeddings (fp32)"}
ATTACKS = {"nearest-neighbour": "nearest neighbour (paper)", "maximum-likelihood": "maximum likelihood",
           "prior-ml": "ML + unigram prior", "beam-lm": "beam MAP + LM prior"}
SUBSETS = ("all", "content", "spans")


def _level(key: str) -> tuple[int, float]:
    bits, mu = key.split("/")
    return int(bits[1:]), float(mu[2:])


def _key(bits: int, mu: float) -> str:
    return f"n{bits}/mu{mu:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _eps(value: float) -> str:
    return f"{value:.3g}" if value < 1e4 else f"{value:.2e}"


def perplexity(nll: list[float]) -> tuple[float, float]:
    """exp(mean NLL) and its bootstrap SE."""
    return math.exp(float(np.mean(nll))), bootstrap_se(np.exp, np.asarray(nll))


def retained(row: list[float], reference: list[float], clean: list[float]) -> tuple[float, float]:
    """Context retained against a reference, (NLL_ref - NLL_row) / (NLL_ref - NLL_clean), and its paired SE."""
    ratio = lambda r, ref, c: (ref - r) / (ref - c)  # noqa: E731
    return float(ratio(np.mean(row), np.mean(reference), np.mean(clean))), bootstrap_se(ratio, np.asarray(row),
                                                                                        np.asarray(reference),
                                                                                        np.asarray(clean))


def _retained_text(value: float, se: float) -> str:
    return f"{value:+.2f} ± {se:.2f}" + (" (~0)" if within(value, se) else "")


def levels_of(cells: dict, corpus: str, row: str = "del") -> list[tuple[int, float]]:
    found = {_level(k[len(f"{corpus}/{row}/"):]) for k in cells if k.startswith(f"{corpus}/{row}/n")}
    return sorted(found, key=lambda lv: (-lv[0], lv[1]))


def strongest(attack_cell: dict | None, subset: str) -> tuple[float, float, str] | None:
    """The best rate over the attacks on a subset: (rate, se, attack)."""
    if not attack_cell:
        return None
    rates = [(a[subset]["rate"], a[subset]["se"], name) for name, a in attack_cell["attacks"].items()
             if subset in a and a[subset]["rate"] is not None]
    return max(rates) if rates else None


def _rate(found: tuple[float, float, str] | None, name: bool = False) -> str:
    if found is None:
        return "-"
    return f"{found[0]:.1%} ± {found[1]:.1%}" + (f" ({ATTACKS.get(found[2], found[2])})" if name else "")


def utility_text(cells: dict, corpus: str, key: str) -> str:
    """'perplexity ± SE; retained vs mismatched; vs nothing' for one row cell."""
    cell, clean, nothing = cells.get(key), cells.get(f"{corpus}/clean"), cells.get(f"{corpus}/nothing")
    if not cell or "nll" not in cell:
        return "-" if not cell else "n/a"
    ppl, se = perplexity(cell["nll"])
    parts = [f"{ppl:.1f} ± {se:.1f}"]
    if clean and "nll_mismatched" in cell:
        parts.append("vs mismatched " + _retained_text(*retained(cell["nll"], cell["nll_mismatched"], clean["nll"])))
    if clean and nothing:
        parts.append("vs nothing " + _retained_text(*retained(cell["nll"], nothing["nll"], clean["nll"])))
    return "; ".join(parts)


def render(results: dict) -> str:
    """Every table of the run, in markdown."""
    plan, cells = results["plan"], results["cells"]
    corpora = plan["corpora"]
    info = results.get("corpora", {})
    operating = results.get("operating_mu")
    out = [f"{results.get('model', '?')}; k={results.get('dim', '?')}, c={results.get('clip', '?')}, delta=1e-5, "
           f"seed {plan['seed']}; {plan['segments']} segments per text (64-token private prefix, 64-token "
           f"continuation); the beam attack on {plan['attack_segments']} of them (beam width {plan['beam']}), the "
           "others on all; "
           f"{results.get('seconds', 0) / 60:.0f} min of compute. Texts: "
           + ", ".join(f"{c} (sha256 {info.get(c, {}).get('sha256', '?')[:16]}..., "
                       f"{info.get(c, {}).get('private_share', float('nan')):.1%} of prefix tokens in private spans)"
                       for c in corpora) + ".",
           "", "Perplexity ± bootstrap SE over segments; context retained (NLL_ref - NLL_row) / (NLL_ref - NLL_clean) "
           "against the mismatched control (the same row fed another segment's payload) and against sending "
           "nothing; (~0): within 2 SE of the reference. Recovery: share of tokens the strongest attack recovers "
           "exactly (all / content words / private spans), ± SE over segments.", ""]

    out += ["### Summary per level", ""]
    rows = []
    summary_levels = sorted({lv for corpus in corpora for lv in levels_of(cells, corpus, "del-sp")
                             if cells[f"{corpus}/del-sp/{_key(*lv)}"].get("soft_prompt_exact")},
                            key=lambda lv: (-lv[0], lv[1]))
    default = results.get("sdk_default_mu")
    summary_levels += [(4, mu) for mu in (default, operating) if mu is not None and (4, mu) not in summary_levels]
    for bits, mu in summary_levels:
        key = _key(bits, mu)
        audit = cells.get(f"audit/{key}")
        label = f"{mu:.3g}" + (" (operating point)" if operating is not None and abs(mu - operating) < 1e-9 else "")
        label += " (SDK default)" if bits == 4 and mu == default else ""
        row = [str(bits), label, _eps(audit["epsilon_per_token"]) if audit else "-"]
        for corpus in corpora:
            attack = cells.get(f"{corpus}/attacks/del/{key}")
            row.append(" / ".join(_rate(strongest(attack, s)) for s in ("all", "content")))
        for corpus in corpora:
            row.append(utility_text(cells, corpus, f"{corpus}/del-sp/{key}"))
        row.append(" / ".join(f"{chat['coh']:.3f} ± {chat['coh_se']:.3f}" if chat and "coh" in chat else "-"
                              for chat in (cells.get(f"chat/del/{key}"), cells.get(f"chat/del-sp/{key}"))))
        rows.append(row)
    blank = cells.get("chat/blank")
    floors = [f"{c}: clean {perplexity(cells[f'{c}/clean']['nll'])[0]:.1f}, nothing "
              f"{perplexity(cells[f'{c}/nothing']['nll'])[0]:.1f}" for c in corpora
              if f"{c}/clean" in cells and f"{c}/nothing" in cells]
    out.append(_table(["n", "mu", "epsilon per token", *[f"strongest recovery, {c} (all / content)" for c in corpora],
                       *[f"perplexity, DEL + the served soft prompt, {c}" for c in corpora],
                       "chat COH (template public / wholly private + soft prompt)"], rows))
    out += ["", "Floors: " + "; ".join(floors) + (f"; chat COH of the blank question {blank['coh']:.3f} ± "
                                                   f"{blank['coh_se']:.3f}" if blank and "coh" in blank else ""), ""]

    for corpus in corpora:
        out += ["", f"### {corpus}", "", "**Floors**", ""]
        rows = []
        for name, label in (("clean", "clean prefix (no privacy)"), ("nothing", "sending nothing"),
                            ("placeholder", f"private spans replaced by \"{results.get('placeholder', '')}\", "
                                            "the rest clean")):
            rows.append([label, utility_text(cells, corpus, f"{corpus}/{name}")])
        shown = set()
        for bits, mu in levels_of(cells, corpus, "sp-nothing"):
            cell = cells[f"{corpus}/sp-nothing/{_key(bits, mu)}"]
            if cell.get("soft_prompt") and cell["soft_prompt"] not in shown:
                shown.add(cell["soft_prompt"])
                rows.append([f"soft prompt {cell['soft_prompt']}, nothing sent",
                             utility_text(cells, corpus, f"{corpus}/sp-nothing/{_key(bits, mu)}")])
        out.append(_table(["row", "perplexity; retained"], rows))
        levels = levels_of(cells, corpus)
        for bits in sorted({n for n, _ in levels}, reverse=True):
            mus = [mu for n, mu in levels if n == bits]
            out += ["", f"**Utility at n={bits}** (perplexity ± SE; context retained vs mismatched; vs nothing)", ""]
            rows = []
            for row, label in ROWS.items():
                texts = [utility_text(cells, corpus, f"{corpus}/{row}/{_key(bits, mu)}") for mu in mus]
                if any(t not in ("-", "n/a") for t in texts):
                    rows.append([label, *texts])
            out.append(_table(["row", *[f"mu={mu:.3g}" for mu in mus]], rows))
            out += ["", f"**Attacks at n={bits}**: tokens recovered exactly, all / content words / private spans", ""]
            rows = []
            for target, label in (("del", "DEL"), ("selective", "selective (spans only, public tokens known)"),
                                  ("gaussian", "Gaussian")):
                cells_here = [cells.get(f"{corpus}/attacks/{target}/{_key(bits, mu)}") for mu in mus]
                if not any(cells_here):
                    continue
                for attack, name in ATTACKS.items():
                    texts = []
                    for cell in cells_here:
                        found = cell and cell["attacks"].get(attack)
                        texts.append(" / ".join("-" if not found or s not in found or found[s]["rate"] is None
                                                else f"{found[s]['rate']:.1%}" for s in SUBSETS))
                    if any(t.strip("- /") for t in texts):
                        rows.append([f"{label}: {name}", *texts])
                rows.append([f"{label}: **strongest**", *[" / ".join(
                    "-" if strongest(c, s) is None else f"{strongest(c, s)[0]:.1%}" for s in SUBSETS)
                    for c in cells_here]])
            alone = cells.get(f"{corpus}/attacks/prior-alone")
            if alone:
                for attack, found in alone["attacks"].items():
                    rows.append([f"no payload: {ATTACKS[attack]} alone", *[" / ".join(
                        "-" if found[s]["rate"] is None else f"{found[s]['rate']:.1%}" for s in SUBSETS)] * len(mus)])
            out.append(_table(["attack", *[f"mu={mu:.3g}" for mu in mus]], rows))

    calibrations = sorted((k, v) for k, v in cells.items() if k.startswith("calibrate/"))
    if calibrations:
        out += ["", f"### Calibrating mu to the strongest attack ({calibrations[0][1]['corpus']}, trained "
                "projection): the mu at which the best of the four attacks recovers the target share of all tokens, "
                "interpolated in log(mu) inside the bracket, and the recovery measured there", ""]
        rows = []
        for key, found in calibrations:
            bits, target = key.split("/")[1][1:], float(key.split("/")[2])
            if found["mu"] is None:
                rows.append([bits, f"{target:.0%}", f"> {found['low']:g}", "-", "-", "-"])
                continue
            rows.append([bits, f"{target:.0%}", f"{found['mu']:.3g}"
                         + (f" (bracket {found['low']:.3g}-{found['high']:.3g})" if found["low"] else " (at most)"),
                         _eps(found["epsilon_per_token"]), _rate(strongest(found, "all"), name=True),
                         _rate(strongest(found, "content"), name=True)])
        out.append(_table(["n", "target", "mu", "epsilon per token", "recovery, all tokens", "content words"], rows))

    chats = [(k, v) for k, v in cells.items() if k.startswith("chat/")]
    if chats:
        out += ["", f"### Chat ({len(cells.get('chat/clean', {}).get('answers', []))} prompts of "
                "bench/data/chat_prompts.jsonl; del: the question privatized, the template public, as the server gets "
                "a chat; del-sp: the whole chat prompt privatized, the served soft prompt prepended; greedy "
                f"{plan['chat_tokens']} tokens): COH against the clean model's answer", ""]
        rows = []
        for key, cell in chats:
            coh = f"{cell['coh']:.3f} ± {cell['coh_se']:.3f}" if "coh" in cell else "1 (the reference)"
            rows.append([key[5:] + (f" [{cell['soft_prompt']}]" if cell.get("soft_prompt") else ""), coh,
                         f"{cell['clean_share']:.0%}", _one_line(cell["answers"][0])[:160]])
        out.append(_table(["row", "COH", "answers without <unk> or loops", "first answer"], rows))

    audits = sorted((k, v) for k, v in cells.items() if k.startswith("audit/"))
    if audits:
        out += ["", "### Formal privacy and the empirical audit (one token, worst-case neighbours, Clopper-Pearson "
                "95%; the lower bound must never exceed the accountant)", ""]
        rows = [[k[6:], _eps(a["epsilon_per_token"]), _eps(a["epsilon_prompt"]), _eps(a["epsilon_clt_per_token"]),
                 _eps(a["epsilon_gaussian_per_token"]), f"{a['epsilon_lower']:.3g}", f"{a['samples']:,}"]
                for k, a in audits]
        out.append(_table(["level", "DEL exact, per token", f"per {PREFIX}-token prompt", "paper's CLT, per token",
                           "Gaussian (mu-GDP), per token", "audit lower bound", "samples per side"], rows))

    if "communication" in results:
        comm = results["communication"]
        out += ["", f"### Communication per token (model width b={comm['width']}; DEL payloads encoded for a "
                f"{PREFIX}-token prompt, header included)", ""]
        rows = [["fp32 embeddings", f"{comm['fp32_bytes_per_token']:g}", "1x"],
                ["fp16 embeddings", f"{comm['fp16_bytes_per_token']:g}", "2x"]]
        for n, c in comm["bits"].items():
            per_token = c["payload_bytes"] / c["tokens"]
            rows.append([f"DEL n={n}, k={results['dim']}", f"{per_token:.2f}",
                         f"{comm['fp32_bytes_per_token'] / per_token:.0f}x"])
        out.append(_table(["what is sent", "bytes per token", "saving vs fp32"], rows))
    return "\n".join(out) + "\n"


def ceiling(mu: float, dim: int, nothing: float, clean: float) -> float:
    """The information-theoretic bound on context retained (vs nothing): PREFIX tokens carry at most
    PREFIX (k/2) ln(1 + mu^2/4k) nats, and the continuation's total gain is CONTINUATION (NLL_nothing - NLL_clean)."""
    return min(1.0, PREFIX * dim / 2 * math.log1p(mu**2 / (4 * dim)) / (CONTINUATION * (nothing - clean)))


def plot(results: dict, directory: Path, prefix: str) -> list[Path]:
    """The frontier (retained vs mismatched against the strongest attack's recovery, one curve per method, n=4)
    and retained vs nothing against mu with the information-theoretic ceiling, one column per text."""
    plt = pyplot()
    if plt is None:
        return []
    plan, cells = results["plan"], results["cells"]
    corpora = plan["corpora"]
    directory.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, len(corpora), figsize=(6 * len(corpora), 9), squeeze=False)
    for column, corpus in enumerate(corpora):
        clean, nothing = cells.get(f"{corpus}/clean"), cells.get(f"{corpus}/nothing")
        if not clean or not nothing:
            continue
        top, bottom = axes[0][column], axes[1][column]
        for row, label in ROWS.items():
            mus = [mu for n, mu in levels_of(cells, corpus, row) if n == 4]
            points = []
            for mu in mus:
                cell = cells.get(f"{corpus}/{row}/{_key(4, mu)}")
                target = {"selective": "selective", "gaussian": "gaussian"}.get(row, "del")
                found = strongest(cells.get(f"{corpus}/attacks/{target}/{_key(4, mu)}"),
                                  "spans" if row == "selective" else "all")
                if cell and "nll" in cell and found:
                    against = retained(cell["nll"], cell["nll_mismatched"], clean["nll"])
                    points.append((found[0], *against, mu, retained(cell["nll"], nothing["nll"], clean["nll"])))
            if not points:
                continue
            x, y, se, mu_values, vs_nothing = zip(*points)
            top.errorbar(x, y, yerr=[2 * s for s in se], marker="o", capsize=3, label=label)
            for xi, yi, mu in zip(x, y, mu_values):
                top.annotate(f"{mu:.3g}", (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
            bottom.errorbar(mu_values, [v[0] for v in vs_nothing], yerr=[2 * v[1] for v in vs_nothing], marker="o",
                            capsize=3, label=label)
        grid = np.geomspace(0.5, 200, 60)
        bound = [ceiling(mu, results["dim"], np.mean(nothing["nll"]), np.mean(clean["nll"])) for mu in grid]
        bottom.plot(grid, bound, color="black", linestyle="--", label="information ceiling")
        del_mus = [mu for n, mu in levels_of(cells, corpus) if n == 4]
        xs = [strongest(cells.get(f"{corpus}/attacks/del/{_key(4, mu)}"), "all") for mu in del_mus]
        pairs = [(x[0], ceiling(mu, results["dim"], np.mean(nothing["nll"]), np.mean(clean["nll"])))
                 for x, mu in zip(xs, del_mus) if x]
        if pairs:
            top.plot(*zip(*sorted(pairs)), color="black", linestyle="--", label="information ceiling (DEL, vs nothing)")
        top.axhline(0, color="grey", linewidth=0.8)
        top.set_ylim(-0.5, 1.1)  # an undetermined ratio (control as good as clean) has error bars beyond this
        top.set_xscale("symlog", linthresh=0.01)
        top.set_xlim(left=0)
        top.set_xlabel("strongest attack's token recovery (selective: on private spans); labels: mu")
        top.set_ylabel("context retained vs the mismatched control (± 2 SE)")
        top.set_title(f"{corpus}, n=4: utility against the strongest attacker", fontsize=9)
        bottom.axhline(0, color="grey", linewidth=0.8)
        bottom.set_xscale("log")
        bottom.set_ylim(-1.5, 1.1)
        bottom.set_xlabel("mu per token")
        bottom.set_ylabel("context retained vs sending nothing (± 2 SE)")
        bottom.set_title(f"{corpus}, n=4: against the information ceiling", fontsize=9)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle(f"{results.get('model', '')}: privacy-utility frontier", fontsize=10)
    fig.tight_layout()
    path = directory / f"{prefix}-frontier.png"
    fig.savefig(path, dpi=110)
    plt.close("all")
    return [path]
