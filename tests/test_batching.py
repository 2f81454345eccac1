"""Dynamic batching on the tiny model: batched answers equal one-at-a-time answers, concurrent requests share
batches, the queue is bounded, and requests abandoned while they wait never run."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from app.engine.batching import Batcher
from app.engine.request import Completion, EngineRequest, GenerationParams
from app.engine.transformers import decode
from app.errors import DeadlineExceeded, Overloaded
from tests.conftest import tiny_runner


def prompts(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(3 + 2 * i, 32, generator=generator) for i in range(count)]  # all different lengths


def request(embeds: torch.Tensor, **params) -> EngineRequest:
    return EngineRequest(prefix=None, embeds=embeds, params=GenerationParams(**params))


def test_a_left_padded_batch_answers_as_each_prompt_alone() -> None:
    runner = tiny_runner()
    requests = [request(e, max_new_tokens=4 + i) for i, e in enumerate(prompts(5))]
    alone = [decode(runner, [r])[0] for r in requests]
    assert decode(runner, requests) == alone
    assert [c.new_tokens for c in alone] == [4, 5, 6, 7, 8]


def test_concurrent_requests_share_batches_and_seeded_sampling_runs_alone() -> None:
    runner = tiny_runner()
    calls: list[int] = []

    def counting(batch: list[EngineRequest]) -> list[Completion]:
        calls.append(len(batch))
        return decode(runner, batch)

    expected = [decode(runner, [request(e, max_new_tokens=6)])[0] for e in prompts(8)]
    batcher = Batcher(counting, max_batch=8, window=0.2, max_queue=64)
    answers: dict[int, Completion] = {}

    def ask(i: int, embeds: torch.Tensor) -> None:
        answers[i] = batcher.submit(request(embeds, max_new_tokens=6)).result()

    threads = [threading.Thread(target=ask, args=(i, e)) for i, e in enumerate(prompts(8))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answers[i] for i in range(8)] == expected
    assert sum(calls) == 8 and len(calls) < 8 and max(calls) > 1

    calls.clear()
    futures = [batcher.submit(request(e, max_new_tokens=3, temperature=1.0, seed=7)) for e in prompts(3)]
    for future in futures:
        future.result()
    assert calls == [1, 1, 1]
    batcher.close()


def blocked_batcher(max_queue: int) -> tuple[Batcher, threading.Event, list[int]]:
    """A batcher whose first batch runs until `release` is set; `ran` lists the sizes of the batches it ran."""
    release, ran = threading.Event(), []

    def run(batch: list[EngineRequest]) -> list[Completion]:
        release.wait(timeout=30)
        ran.append(len(batch))
        return [Completion("ok", (5,), "length") for _ in batch]

    return Batcher(run, max_batch=1, window=0, max_queue=max_queue), release, ran


def test_a_full_queue_refuses_with_overloaded_and_takes_requests_again_once_drained() -> None:
    batcher, release, ran = blocked_batcher(max_queue=2)
    running = batcher.submit(request(prompts(1)[0]))
    time.sleep(0.2)  # the worker took it: it runs, it does not wait
    waiting = [request(prompts(1)[0]) for _ in range(2)]
    answers = [batcher.submit(r) for r in waiting]
    with pytest.raises(Overloaded) as refused:
        batcher.submit(request(prompts(1)[0]))
    assert refused.value.retry_after > 0
    waiting[1].cancelled.set()  # its client went away: its place is free at once
    answers.append(batcher.submit(request(prompts(1)[0])))
    release.set()
    assert [a.result(timeout=10).finish_reason for a in [running, *answers]] == \
        ["length", "length", "cancelled", "length"]
    assert batcher.submit(request(prompts(1)[0])).result(timeout=10).text == "ok"  # recovered at once
    assert ran == [1, 1, 1, 1]  # the cancelled one never ran
    batcher.close()


def test_requests_cancelled_or_past_their_deadline_while_waiting_never_run() -> None:
    batcher, release, ran = blocked_batcher(max_queue=8)
    batcher.submit(request(prompts(1)[0]))
    time.sleep(0.2)
    gone, late, kept = (request(prompts(1)[0]) for _ in range(3))
    late.deadline = time.monotonic() + 0.1
    answers = [batcher.submit(r) for r in (gone, late, kept)]
    gone.cancelled.set()
    time.sleep(0.2)
    release.set()
    assert answers[0].result(timeout=10).finish_reason == "cancelled"
    with pytest.raises(DeadlineExceeded):
        answers[1].result(timeout=10)
    assert answers[2].result(timeout=10).text == "ok"
    assert ran == [1, 1]  # the first and `kept`: the other two cost nothing
    batcher.close()
