"""Dynamic batching: requests that arrive while the model is busy run together in one batch, from a bounded queue.

A worker thread takes the first waiting request, waits up to `window` seconds for more (up to `max_batch`), and
runs every request that shares its batch key (sampling settings and soft prompt) in one batch. Prompts of different
lengths and different max_new_tokens batch together; seeded sampling runs alone. At most `max_queue` requests wait
(not counting the batch that runs): beyond that `submit` raises Overloaded. A request cancelled or past its deadline
while it waits never runs.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

from app.engine.request import Completion, EngineRequest
from app.errors import DeadlineExceeded, Overloaded

RunBatch = Callable[[list[EngineRequest]], list[Completion]]


class Batcher:
    def __init__(self, run: RunBatch, max_batch: int, window: float, max_queue: int) -> None:
        self.run, self.max_batch, self.window, self.max_queue = run, max_batch, window, max_queue
        self._queue: queue.Queue[EngineRequest | None] = queue.Queue()
        self._answers: dict[EngineRequest, Future[Completion]] = {}
        self._waiting: list[EngineRequest] = []
        self._lock = threading.Lock()
        self._last_batch_seconds = 1.0
        self._worker = threading.Thread(target=self._work, name="veil-batcher", daemon=True)
        self._worker.start()

    def submit(self, request: EngineRequest) -> Future[Completion]:
        """Queue a request; its future gets the Completion. Raises Overloaded when `max_queue` already wait."""
        with self._lock:  # requests cancelled while they wait hold no place (the worker drops them unrun)
            waiting = sum(not r.cancelled.is_set() for r in self._answers)
            if waiting >= self.max_queue:
                batches_ahead = waiting / self.max_batch + 1
                raise Overloaded(f"{waiting} requests are waiting, the most this server queues",
                                 retry_after=batches_ahead * self._last_batch_seconds)
            answer = self._answers[request] = Future()
        self._queue.put(request)
        return answer

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
            self._drop_abandoned()
            if self._waiting:
                self._run(self._take_batch())

    def _drop_abandoned(self) -> None:
        """Answer the waiting requests that were cancelled or ran out of time, without running them."""
        now = time.monotonic()
        for request in list(self._waiting):
            if request.cancelled.is_set():
                reason = "cancelled"
            elif request.deadline is not None and now > request.deadline:
                reason = "deadline"
            else:
                continue
            self._waiting.remove(request)
            with self._lock:
                answer = self._answers.pop(request)
            settle(answer, Completion("", (), reason))

    def _take_batch(self) -> list[tuple[EngineRequest, Future[Completion]]]:
        """The oldest waiting request and every other one that can share its batch, with their futures."""
        key = self._waiting[0].batch_key()
        batch = [self._waiting[0]] if key is None else \
            [r for r in self._waiting if r.batch_key() == key][: self.max_batch]
        self._waiting = [r for r in self._waiting if r not in batch]
        with self._lock:  # running, no longer waiting
            return [(r, self._answers.pop(r)) for r in batch]

    def _run(self, batch: list[tuple[EngineRequest, Future[Completion]]]) -> None:
        start = time.monotonic()
        try:
            completions = self.run([request for request, _ in batch])
        except Exception as err:  # every caller in the batch gets the error, the worker lives on
            for _, answer in batch:
                answer.set_exception(err)
            return
        self._last_batch_seconds = time.monotonic() - start
        for (_, answer), completion in zip(batch, completions):
            settle(answer, completion)


def settle(answer: Future[Completion], completion: Completion) -> None:
    """Complete a request's future: a generation stopped by its deadline fails with DeadlineExceeded."""
    if completion.finish_reason == "deadline":
        answer.set_exception(DeadlineExceeded("the generation ran past the server's deadline and was stopped"))
    else:
        answer.set_result(completion)
