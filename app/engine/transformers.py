"""The default backend: the model in this process (transformers), the dynamic batcher, the soft prompt's KV cache."""

from __future__ import annotations

from concurrent.futures import Future

from app.batching import Batcher
from app.engine.prefix_cache import PrefixCache
from app.engine.request import Completion, EngineRequest
from app.model_runner import ModelRunner


class TransformersBackend:
    """Requests queue in the batcher; each batch shares a soft prompt, whose keys and values come from the cache."""

    def __init__(self, runner: ModelRunner, *, max_batch: int, window: float, max_queue: int) -> None:
        self.runner = runner
        self.prefixes = PrefixCache(runner.model)
        self.batcher = Batcher(self._run, max_batch=max_batch, window=window, max_queue=max_queue)

    def submit(self, request: EngineRequest) -> Future[Completion]:
        return self.batcher.submit(request)

    def close(self) -> None:
        self.batcher.close()

    def _run(self, batch: list[EngineRequest]) -> list[Completion]:
        """A batch shares its soft prompt (it is part of the batch key)."""
        prefix = batch[0].prefix
        return self.runner.decode(batch, self.prefixes.get(prefix) if prefix else None)
