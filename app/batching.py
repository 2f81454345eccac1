"""Dynamic batching: generate requests that arrive while the model is busy run together in one generate() call.

A worker thread takes the first waiting request, waits up to `window` seconds for more (up to `max_batch`), and
runs every request whose GenerationParams share its batch key in one left-padded batch. Prompts of different
lengths and different max_new_tokens batch together; seeded sampling runs alone.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from app.model_runner import GenerationParams, ModelRunner


@dataclass(eq=False)  # compared by identity
class _Request:
    embeds: torch.Tensor
    params: GenerationParams
    answer: Future = field(default_factory=Future)


class Batcher:
    def __init__(self, runner: ModelRunner, max_batch: int, window: float) -> None:
        self.runner, self.max_batch, self.window = runner, max_batch, window
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._waiting: list[_Request] = []
        self._worker = threading.Thread(target=self._work, name="veil-batcher", daemon=True)
        self._worker.start()

    def generate(self, embeds: torch.Tensor, params: GenerationParams) -> tuple[str, int]:
        """Blocks until this request's answer is ready: (text, new token count)."""
        request = _Request(embeds, params)
        self._queue.put(request)
        return request.answer.result()

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=60)

    def _work(self) -> None:
        while True:
            if not self._waiting:
                first = self._queue.get()
                if first is None:
                    return
                self._waiting.append(first)
            deadline = time.monotonic() + self.window
            while len(self._waiting) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    request = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if request is None:
                    self._queue.put(None)  # finish what waits, then stop
                    break
                self._waiting.append(request)
            self._run(self._take_batch())

    def _take_batch(self) -> list[_Request]:
        """The oldest waiting request and every other one that can share its generate() call."""
        key = self._waiting[0].params.batch_key()
        batch = [self._waiting[0]] if key is None else \
            [r for r in self._waiting if r.params.batch_key() == key][: self.max_batch]
        self._waiting = [r for r in self._waiting if r not in batch]
        return batch

    def _run(self, batch: list[_Request]) -> None:
        try:
            answers = self.runner.generate_batch([r.embeds for r in batch], [r.params for r in batch])
        except Exception as err:  # every waiting caller gets the error, the worker lives on
            for request in batch:
                request.answer.set_exception(err)
            return
        for request, answer in zip(batch, answers):
            request.answer.set_result(answer)
