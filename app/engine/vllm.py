"""The vLLM backend (GPU): vLLM's async engine in this process, fed prompt embeddings.

vLLM removed prompt adapters, so the soft prompt goes inside the embeddings, before the reconstructed prompt, as in
the transformers backend; with prefix caching on, vLLM hashes the embeddings of each full KV block and reuses the
soft prompt's blocks across requests (prefix caching for prompt embeddings: vLLM PR #27219). The tensors are
handed over in process: nothing here, or anywhere in veil, accepts serialized tensors from the network (vLLM's
own OpenAI server loads client-sent `prompt_embeds` with torch.load, cf. CVE-2025-62164; veil never runs it).

vLLM's engine is asyncio; it runs on its own event loop in a thread, and `submit` hands each request to it
(`asyncio.run_coroutine_threadsafe`), so the backend has the same thread-safe, future-returning face as the
transformers one. vLLM schedules, batches and queues itself (continuous batching); veil bounds what it hands over.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, Callable

import torch

from app.engine.request import Completion, EngineRequest, FinishReason, GenerationParams
from app.errors import DeadlineExceeded, Overloaded
from app.model_runner import ModelRunner, resolve_model
from app.settings import ServerSettings

WATCH_SECONDS = 0.02
"""How often a request's cancel event and deadline are looked at while vLLM works on it."""


def sampling_params(params: GenerationParams) -> Any:
    """vLLM's SamplingParams for ours (temperature 0 is greedy; vLLM matches and strips the stop strings)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                          seed=params.seed, stop=list(params.stop) or None)


class VllmBackend:
    def __init__(self, create_engine: Callable[[], Any], *, dtype: torch.dtype, max_in_flight: int,
                 make_params: Callable[[GenerationParams], Any] = sampling_params) -> None:
        """`create_engine` makes the engine (an AsyncLLM, or anything with its async `generate`) on the backend's
        event loop; at most `max_in_flight` requests are handed to it at once, more raise Overloaded."""
        self.dtype, self.max_in_flight, self.make_params = dtype, max_in_flight, make_params
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="veil-vllm", daemon=True)
        self._thread.start()
        self._in_flight = 0
        self._lock = threading.Lock()

        async def create() -> Any:
            return create_engine()

        self.engine = asyncio.run_coroutine_threadsafe(create(), self._loop).result()

    @classmethod
    def load(cls, runner: ModelRunner, settings: ServerSettings) -> "VllmBackend":
        """vLLM's engine on the served model; needs a CUDA GPU and `pip install '.[vllm]'`."""
        if not torch.cuda.is_available():
            raise RuntimeError("the vllm backend needs a CUDA GPU; use VEIL_BACKEND=transformers on this machine")
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError as err:
            raise RuntimeError("the vllm backend needs vLLM: pip install '.[vllm]' (on a machine with a GPU)") from err
        args = AsyncEngineArgs(model=resolve_model(settings.model, settings.cache_dir), enable_prompt_embeds=True,
                               enable_prefix_caching=True, max_num_seqs=settings.max_batch_size,
                               max_model_len=settings.max_prompt_tokens + settings.max_new_tokens + 256,
                               dtype="bfloat16")
        return cls(lambda: AsyncLLMEngine.from_engine_args(args), dtype=torch.bfloat16,
                   max_in_flight=settings.max_batch_size + settings.max_queue)

    def submit(self, request: EngineRequest) -> Future[Completion]:
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                raise Overloaded(f"{self._in_flight} requests are in flight, the most this server takes")
            self._in_flight += 1
        embeds = request.embeds if request.prefix is None else torch.cat([request.prefix.embeddings, request.embeds])
        answer = asyncio.run_coroutine_threadsafe(self._generate(request, embeds.to(self.dtype)), self._loop)
        answer.add_done_callback(self._finished)
        return answer

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def _finished(self, _: Future) -> None:
        with self._lock:
            self._in_flight -= 1

    async def _generate(self, request: EngineRequest, embeds: torch.Tensor) -> Completion:
        """Run one request on vLLM, watching its cancel event and deadline; cancelling the consuming task makes
        vLLM abort the request (its `generate` aborts on cancellation)."""
        outputs: list[Any] = []  # the latest of vLLM's (cumulative) outputs
        consume = asyncio.ensure_future(self._consume(request, embeds, outputs))
        reason: FinishReason | None = None
        while not consume.done():
            await asyncio.wait({consume}, timeout=WATCH_SECONDS)
            if consume.done():
                break
            if request.cancelled.is_set():
                reason = "cancelled"
            elif request.deadline is not None and time.monotonic() > request.deadline:
                reason = "deadline"
            if reason:
                consume.cancel()
                await asyncio.gather(consume, return_exceptions=True)
                break
        if reason == "deadline":
            raise DeadlineExceeded("the generation ran past the server's deadline and was stopped")
        if reason is None:
            consume.result()  # re-raise what failed
        if not outputs:
            return Completion("", (), reason or "stop")
        last = outputs[0].outputs[0]
        return Completion(last.text, tuple(last.token_ids),
                          reason or ("length" if last.finish_reason == "length" else "stop"))

    async def _consume(self, request: EngineRequest, embeds: torch.Tensor, outputs: list[Any]) -> None:
        sent = 0
        async for output in self.engine.generate({"prompt_embeds": embeds}, self.make_params(request.params),
                                                 uuid.uuid4().hex):
            outputs[:] = [output]
            text = output.outputs[0].text  # cumulative, stop strings held back and stripped by vLLM
            if request.on_text is not None and len(text) > sent and not request.cancelled.is_set():
                try:
                    request.on_text(text[sent:])
                except Exception:  # the consumer is gone: stop at the next look
                    request.cancelled.set()
                sent = len(text)
