"""Choosing the next token (app.engine.sampling): the argmax at temperature 0, else a draw from the softmax at the
temperature restricted to the top-p nucleus, checked against the closed-form probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from app.engine.request import GenerationParams
from app.engine.sampling import next_tokens

PROBS = [0.5, 0.3, 0.15, 0.05]
DRAWS = 20_000
Z = 5.0  # standard errors allowed per frequency


def tempered(temperature: float) -> list[float]:
    weights = [p ** (1 / temperature) for p in PROBS]
    return [w / sum(weights) for w in weights]


@pytest.mark.parametrize(("temperature", "top_p", "expected"), [
    (1.0, 1.0, PROBS),
    (0.5, 1.0, tempered(0.5)),
    (2.0, 1.0, tempered(2.0)),
    (1.0, 0.75, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # the smallest set reaching 0.75: the first two
    (1.0, 0.4, [1.0, 0.0, 0.0, 0.0]),
])
def test_sampling_draws_from_the_tempered_nucleus(temperature: float, top_p: float, expected: list[float]) -> None:
    logits = torch.log(torch.tensor(PROBS)).repeat(DRAWS, 1)
    params = GenerationParams(temperature=temperature, top_p=top_p)
    tokens = next_tokens(logits, params, torch.Generator().manual_seed(0))
    frequencies = (torch.bincount(tokens, minlength=len(PROBS)).double() / DRAWS).tolist()
    for got, p in zip(frequencies, expected):
        assert abs(got - p) <= Z * math.sqrt(p * (1 - p) / DRAWS), (frequencies, expected)


def test_temperature_zero_is_the_argmax_of_each_row() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.5, 0.9]])
    assert next_tokens(logits, GenerationParams(temperature=0.0), None).tolist() == [1, 0, 2]
