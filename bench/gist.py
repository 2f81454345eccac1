"""A gist prefix on the server (issue 25, item 2): do pooled token posteriors carry what per-token reading does not?

    python -m bench.gist [--mu 5 10] [--segments 32] [--span 16] [--steps 150] [--batch 4]

From the levels a DEL client sends (the shipped k = 72 projection, n = 4), the server computes each position's token
posterior, likelihood x the attacker's unigram prior from public text (as the prior-ml attack does), and its
posterior-mean embedding. Rows on the held-out novel, no soft prompt, each with its mismatched control (another
segment's levels through the same path):

- del: the server's usual reconstruction (the baseline);
- posterior: the start token, then the posterior-mean embedding in place of the reconstruction at every position (a
  Bayes denoiser);
- pooled: the start token, then the posterior means averaged over spans of `span` tokens (P/span embeddings);
- gist: the start token, then the pooled vectors through a small adapter distilled against the clean model (KL of
  the continuation after the clean prefix; trained on the other novels, alternating the mus of --mu).
The per-token reconstruction is left out of the gist rows: the del row shows it carries nothing of the prompt.

Every row is computed by the server from the same received levels, so none can change what the server learns about
the tokens (post-processing); the per-token attacks on those levels are reported with them. Resumable: cells are
saved one by one in bench/results/gist.json; the adapter is kept in bench/results/gist-adapter.safetensors.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm import tqdm

from app.files import write_bytes_atomic
from app.model_runner import ModelRunner
from app.reconstruction import load_projection
from app.settings import ServerSettings
from app.training.data import CORPORA, HELD_OUT_NOVEL, read_corpus, token_segments
from app.training.distill import distillation_kl
from app.training.evaluate import start_prefix
from bench import attacks
from bench.cells import run_cells
from bench.pipeline import load_sample, send
from bench.privacy_utility import (
    PRIOR_CORPORA,
    TRAINED_PROJECTION,
    Bench,
    Plan,
    level_key,
)
from bench.privacy_utility_report import perplexity, retained, strongest

RESULTS = Path(__file__).parent / "results"
BITS = 4
TRAIN_CONTINUATION = 16
TRAIN_NOVELS = tuple(name for name in CORPORA if name.startswith("austen-") and name != HELD_OUT_NOVEL)


class GistReader:
    """The server's side of the gist: received levels -> per-position posterior means -> pooled span vectors."""

    def __init__(self, bench: Bench, span: int) -> None:
        self.bench, self.span = bench, span
        self.table = bench.table.float()

    def posterior_means(self, levels: np.ndarray, mu: float) -> torch.Tensor:
        """E[embedding | levels] per position (B x P x b) under the unigram prior."""
        terms = attacks.likelihood_terms(self.bench.client_table, self.bench.params(BITS, mu))
        flat = levels.reshape(-1, levels.shape[-1])
        means = []
        for start in range(0, len(flat), attacks.CHUNK):
            scores = attacks.log_likelihoods(flat[start : start + attacks.CHUNK], terms) + self.bench.log_prior
            posterior = torch.from_numpy(scores).softmax(dim=1).float()
            means.append(posterior @ self.table)
        return torch.cat(means).view(*levels.shape[:-1], -1)

    def pooled(self, levels: np.ndarray, mu: float) -> torch.Tensor:
        """The posterior means averaged over consecutive spans of `span` positions (B x P/span x b)."""
        means = self.posterior_means(levels, mu)
        return means.view(means.shape[0], -1, self.span, means.shape[-1]).mean(dim=2)


class GistAdapter(nn.Module):
    """Pooled vectors (B x S x b) -> S prefix embeddings: a standardized MLP plus a learned embedding per slot.

    The last layer starts at zero, so training starts from a constant prefix (a soft prompt) and learns only what
    depends on the pooled input on top of it."""

    def __init__(self, center: torch.Tensor, spread: torch.Tensor, slots: torch.Tensor, hidden: int = 1024) -> None:
        super().__init__()
        width = slots.shape[-1]
        self.register_buffer("center", center)
        self.register_buffer("spread", spread)
        self.slots = nn.Parameter(slots.clone())
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.slots + self.mlp((pooled - self.center) / self.spread)


def training_segments(bench: Bench, data_dir: Path) -> torch.Tensor:
    """Prefix + continuation segments (N x (P + TRAIN_CONTINUATION)) of the novels other than the held-out one."""
    text = "\n".join(read_corpus(name, data_dir) for name in TRAIN_NOVELS)
    prefix = bench.samples[HELD_OUT_NOVEL].prefix_ids.shape[1]
    return token_segments(text, bench.runner.tokenizer, prefix + TRAIN_CONTINUATION)


def train_adapter(bench: Bench, reader: GistReader, segments: torch.Tensor, mus: list[float], steps: int, batch: int,
                  lr: float = 1e-3, seed: int = 0) -> tuple[GistAdapter, list[float]]:
    """Distil the adapter: KL(model | clean prefix || model | gist + del prefix) on the continuation."""
    generator = torch.Generator().manual_seed(seed)
    prefix_len = bench.samples[HELD_OUT_NOVEL].prefix_ids.shape[1]
    probe = segments[torch.randperm(len(segments), generator=generator)[:64], :prefix_len]
    pooled = torch.cat([reader.pooled(send(bench.client_table, probe, bench.params(BITS, mu), seed), mu)
                        for mu in mus])
    adapter = GistAdapter(pooled.mean(dim=0).mean(dim=0), pooled.flatten(0, 1).std(dim=0).clamp_min(1e-6),
                          pooled.mean(dim=0))
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.01)
    bench.model.requires_grad_(False)
    losses = []
    for step in (progress := tqdm(range(steps), desc="gist adapter", unit="step")):
        rows = torch.randint(len(segments), (batch,), generator=generator)
        prefix_ids, continuation = segments[rows, :prefix_len], segments[rows, prefix_len:]
        mu = mus[step % len(mus)]
        levels = send(bench.client_table, prefix_ids, bench.params(BITS, mu), seed + 1 + step)
        student = torch.cat([start_prefix(bench.model, bench.start_id, batch), adapter(reader.pooled(levels, mu))],
                            dim=1)
        loss = distillation_kl(bench.model, bench.table[prefix_ids], student, continuation).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(kl=f"{np.mean(losses[-20:]):.3f}")
    return adapter.eval(), losses



def measure(bench: Bench, reader: GistReader, mus: list[float], steps: int, batch: int, settings: ServerSettings,
            path: Path, command: str) -> dict:
    """The floors, the adapter, then each row at each mu: cells saved one by one in `path`."""
    sample = bench.samples[HELD_OUT_NOVEL]
    weights = path.with_name("gist-adapter.safetensors")

    def train() -> dict:
        adapter, losses = train_adapter(bench, reader, training_segments(bench, settings.data_dir), mus, steps, batch)
        write_bytes_atomic(weights, save({k: v.contiguous() for k, v in adapter.state_dict().items()}))
        return {"kl_first": float(np.mean(losses[:20])), "kl_last": float(np.mean(losses[-20:])), "kl": losses}

    def adapter() -> GistAdapter:
        state = load_file(str(weights))
        loaded = GistAdapter(state["center"], state["spread"], state["slots"],
                             hidden=state["mlp.0.weight"].shape[0])
        loaded.load_state_dict(state)
        return loaded.eval()

    def row(name: str, mu: float) -> dict:
        levels = bench.levels(sample, BITS, mu)
        read = reader.posterior_means(levels, mu) if name == "posterior" else reader.pooled(levels, mu)
        if name == "gist":
            with torch.no_grad():
                read = adapter()(read)
        return bench.scored(sample, torch.cat([start_prefix(bench.model, bench.start_id, len(read)), read], dim=1))

    cells = [(f"floor/{f}", lambda f=f: bench.floor(HELD_OUT_NOVEL, f)) for f in ("clean", "nothing")]
    cells.append(("adapter", train))
    for mu in mus:
        key = level_key(BITS, mu)
        cells.append((f"del/{key}", lambda m=mu: {**bench.row(HELD_OUT_NOVEL, "del", BITS, m),
                                                  **bench.del_attacks(HELD_OUT_NOVEL, BITS, m)}))
        cells += [(f"{name}/{key}", lambda n=name, m=mu: row(n, m)) for name in ("posterior", "pooled", "gist")]
    plan = {"corpus": HELD_OUT_NOVEL, "segments": len(sample.prefix_ids), "bits": BITS, "mus": mus,
            "span": reader.span, "steps": steps, "batch": batch, "train": list(TRAIN_NOVELS),
            "train_continuation": TRAIN_CONTINUATION}
    about = {"sha256": sample.sha256, "model": bench.runner.model_id, "projection": bench.published.id,
             "command": command}
    return run_cells(path, plan, cells, desc="gist", metadata=about)


def render(results: dict) -> str:
    """The markdown table: one row per variant and mu."""
    cells, plan = results["cells"], results["plan"]
    clean, nothing = cells["floor/clean"], cells["floor/nothing"]
    lines = [(f"Held-out {plan['corpus']}, {plan['segments']} segments, n = {BITS}, projection {results['projection']}, "
             f"no soft prompt; spans of {plan['span']} tokens. Clean perplexity {perplexity(clean['nll'])[0]:.1f}, "
             f"nothing sent {perplexity(nothing['nll'])[0]:.1f}. Adapter: {plan['steps']} steps x {plan['batch']}, "
             f"KL {cells['adapter']['kl_first']:.3f} -> {cells['adapter']['kl_last']:.3f} nats/token (training)."),
             "", ("| row | mu | perplexity | retained vs mismatched | retained vs nothing | "
                  "strongest per-token attack on the same levels |"), "|---|---|---|---|---|---|"]
    for mu in plan["mus"]:
        key = level_key(BITS, mu)
        rate, se, attack = strongest(cells.get(f"del/{key}"), "all")
        for name in ("del", "posterior", "pooled", "gist"):
            cell = cells.get(f"{name}/{key}")
            if cell is None:
                continue
            ppl, ppl_se = perplexity(cell["nll"])
            mis, mis_se = retained(cell["nll"], cell["nll_mismatched"], clean["nll"])
            nth, nth_se = retained(cell["nll"], nothing["nll"], clean["nll"])
            lines.append(f"| {name} | {mu:g} | {ppl:.1f} ± {ppl_se:.1f} | {mis:+.3f} ± {mis_se:.3f} | "
                         f"{nth:+.3f} ± {nth_se:.3f} | {rate:.3f} ± {se:.3f} ({attack}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mu", nargs="+", type=float, default=[5.0, 10.0])
    parser.add_argument("--segments", type=int, default=32)
    parser.add_argument("--span", type=int, default=16, help="tokens pooled into one gist vector")
    parser.add_argument("--steps", type=int, default=150, help="adapter training steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = ServerSettings()
    runner = ModelRunner.load(settings.model, settings.cache_dir)
    sample = load_sample(runner.tokenizer, HELD_OUT_NOVEL, settings.data_dir, args.segments)
    if sample.prefix_ids.shape[1] % args.span:
        raise SystemExit(f"--span must divide the prefix length {sample.prefix_ids.shape[1]}")
    prior_text = "\n".join(read_corpus(name, settings.data_dir) for name in PRIOR_CORPORA)
    prior_ids = np.array(runner.tokenizer(prior_text, add_special_tokens=False)["input_ids"])
    plan = Plan(corpora=(HELD_OUT_NOVEL,), segments=args.segments, attack_segments=0, levels=(), beam=0,
                chat_prompts=0, chat_tokens=0, audit_samples=0, search_steps=0)
    published = load_projection(settings.projection_dir / TRAINED_PROJECTION)
    bench = Bench(runner, [sample], published, [], encoder=None, clip=published.projection.clip, plan=plan,
                  prior_ids=prior_ids, chat_prompts=[])
    command = "python -m bench.gist " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = measure(bench, GistReader(bench, args.span), args.mu, args.steps, args.batch, settings,
                      args.out / "gist.json", command)
    print(render(results))


if __name__ == "__main__":
    main()
