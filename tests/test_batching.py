"""Dynamic batching on the tiny model: batched answers equal one-at-a-time answers, and concurrent requests share
generate() calls."""

from __future__ import annotations

import threading

import torch

from app.batching import Batcher
from app.model_runner import GenerationParams
from tests.conftest import tiny_runner


def prompts(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(3 + 2 * i, 32, generator=generator) for i in range(count)]  # all different lengths


def test_a_left_padded_batch_answers_as_each_prompt_alone() -> None:
    runner = tiny_runner()
    params = [GenerationParams(max_new_tokens=4 + i) for i in range(5)]
    alone = [runner.generate(e, p) for e, p in zip(prompts(5), params)]
    assert runner.generate_batch(prompts(5), params) == alone
    assert [count for _, count in alone] == [4, 5, 6, 7, 8]


def test_concurrent_requests_share_generate_calls_and_seeded_sampling_runs_alone() -> None:
    runner = tiny_runner()
    calls: list[int] = []
    original = runner.generate_batch

    def counting(embeds, params):
        calls.append(len(embeds))
        return original(embeds, params)

    expected = [runner.generate(e, GenerationParams(max_new_tokens=6)) for e in prompts(8)]
    runner.generate_batch = counting
    batcher = Batcher(runner, max_batch=8, window=0.2)
    answers: dict[int, tuple] = {}

    def ask(i: int, embeds: torch.Tensor) -> None:
        answers[i] = batcher.generate(embeds, GenerationParams(max_new_tokens=6))

    threads = [threading.Thread(target=ask, args=(i, e)) for i, e in enumerate(prompts(8))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answers[i] for i in range(8)] == expected
    assert sum(calls) == 8 and len(calls) < 8 and max(calls) > 1

    calls.clear()
    seeded = GenerationParams(max_new_tokens=3, temperature=1.0, seed=7)
    threads = [threading.Thread(target=batcher.generate, args=(e, seeded)) for e in prompts(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1, 1, 1]
    batcher.close()


def test_a_stream_whose_reader_goes_away_stops_generating_and_frees_the_model() -> None:
    runner = tiny_runner()
    forward, steps = runner.model.forward, []
    runner.model.forward = lambda *args, **kwargs: steps.append(1) or forward(*args, **kwargs)
    stream = runner.stream(prompts(1)[0], GenerationParams(max_new_tokens=200))
    next(stream)
    stream.close()  # what a disconnected client's response does
    assert len(steps) < 50  # stopped at the next token, not after 200
    assert runner._lock.acquire(timeout=1)  # the model is free again
    runner._lock.release()
