"""Never worse than sending nothing: a soft prompt's check on fixed segments of a text it never trained on.

Each segment's continuation is scored (next-token NLL, nats) after
- the clean prefix (no privacy: the ceiling),
- nothing: one start token (what a user who sends nothing gets: the floor),
- the soft prompt alone, with nothing sent,
- the soft prompt and the privatized prefix (the private path, matched),
- the soft prompt and *another* segment's privatized prefix (the mismatched control: same noise level, no
  information about this continuation).
The artifact passes if the private path's mean NLL is at or below the floor's. Context retained against the
mismatched control is (NLL_mismatched - NLL_matched) / (NLL_mismatched - NLL_clean), with a bootstrap standard
error over segments.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from app.model_runner import ModelRunner
from app.reconstruction import Projection
from app.training.data import evenly_spaced, token_segments
from app.training.evaluate import continuation_loss, start_prefix, start_token
from app.training.soft_prompt import privatized_prefix

ROWS = ("clean prefix", "nothing sent", "soft prompt alone", "private path", "mismatched control")


def check_segments(text: str, tokenizer, prefix_tokens: int, continuation_tokens: int, count: int) -> torch.Tensor:
    """`count` evenly spaced segments of prefix + continuation tokens over the whole held-out text."""
    return evenly_spaced(token_segments(text, tokenizer, prefix_tokens + continuation_tokens), count)


def path_nlls(runner: ModelRunner, projection: Projection, bits: int, mu: float, prompt: torch.Tensor | None,
              segments: torch.Tensor, prefix_tokens: int, seed: int, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Per-segment NLL of the continuation for every row of ROWS (fixed noise from `seed`)."""
    model, table = runner.model, runner.input_embeddings
    prefix, continuation = segments[:, :prefix_tokens].to(model.device), segments[:, prefix_tokens:].to(model.device)
    received = privatized_prefix(runner, projection, bits, mu)(prefix, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        soft = (prompt.to(table.device).expand(len(segments), -1, -1) if prompt is not None
                else received[:, :0])
        start = start_prefix(model, start_token(runner.tokenizer), len(segments))
        inputs = {"clean prefix": table[prefix], "nothing sent": start,
                  "soft prompt alone": soft if prompt is not None else start,
                  "private path": torch.cat([soft, received], 1),
                  "mismatched control": torch.cat([soft, received.roll(1, 0)], 1)}
        return {row: torch.cat([continuation_loss(model, inputs[row][i : i + batch_size],
                                                  continuation[i : i + batch_size])
                                for i in range(0, len(segments), batch_size)]).cpu().numpy() for row in ROWS}


def context_retained(nll: dict[str, np.ndarray]) -> float:
    """(NLL_mismatched - NLL_matched) / (NLL_mismatched - NLL_clean), on means over segments."""
    mismatched = nll["mismatched control"].mean()
    return float((mismatched - nll["private path"].mean()) / (mismatched - nll["clean prefix"].mean()))


def bootstrap_se(nll: dict[str, np.ndarray], statistic, draws: int = 1000, seed: int = 0) -> float:
    """Standard error of `statistic(nll)` by resampling segments with replacement."""
    rng = np.random.default_rng(seed)
    count = len(next(iter(nll.values())))
    values = []
    for _ in range(draws):
        pick = rng.integers(count, size=count)
        values.append(statistic({row: v[pick] for row, v in nll.items()}))
    return float(np.std(values, ddof=1))


def floor_report(nll: dict[str, np.ndarray], data: str) -> dict:
    """The manifest's `floor_check`: perplexities per row, context retained (with its bootstrap SE) and the verdict."""
    mean = {row: float(v.mean()) for row, v in nll.items()}
    passes = mean["private path"] <= mean["nothing sent"]
    perplexity = {row: math.exp(v) for row, v in mean.items()}
    verdict = (f"perplexity {perplexity['private path']:.1f} on {data} is at or below the nothing-sent floor "
               f"{perplexity['nothing sent']:.1f}" if passes else
               f"perplexity {perplexity['private path']:.1f} on {data} is worse than sending nothing "
               f"({perplexity['nothing sent']:.1f}): not served by default")
    return {"data": data, "segments": len(nll["private path"]), "nll": mean, "perplexity": perplexity,
            "context_retained": context_retained(nll), "context_retained_se": bootstrap_se(nll, context_retained),
            "passes": passes, "reason": verdict}


def floor_check(runner: ModelRunner, projection: Projection, bits: int, mu: float, prompt: torch.Tensor | None,
                text: str, data: str, *, prefix_tokens: int = 64, continuation_tokens: int = 64, segments: int = 32,
                seed: int = 0) -> dict:
    """Score a soft prompt on `segments` fixed segments of held-out `text` (named `data`) against the floors."""
    sample = check_segments(text, runner.tokenizer, prefix_tokens, continuation_tokens, segments)
    return floor_report(path_nlls(runner, projection, bits, mu, prompt, sample, prefix_tokens, seed), data)
