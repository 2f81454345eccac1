"""The vLLM backend. Its plumbing (soft prompt inside the embeddings, streamed pieces, cancellation, deadline, bound)
runs everywhere against a stand-in for vLLM's async engine; the real engine needs vLLM and a CUDA GPU, and those
tests skip, saying which is missing, where either is (CI, the development machine)."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from types import SimpleNamespace

import pytest
import torch

from app.engine.prefix_cache import compute_prefix
from app.engine.request import EngineRequest, GenerationParams, SoftPromptPrefix
from app.engine.transformers import decode
from app.engine.vllm import VllmBackend
from app.errors import DeadlineExceeded, Overloaded
from tests.conftest import tiny_runner

MISSING = [what for what, absent in (("vLLM is not installed", importlib.util.find_spec("vllm") is None),
                                     ("no CUDA GPU", not torch.cuda.is_available())) if absent]
needs_vllm_gpu = pytest.mark.skipif(bool(MISSING),
                                    reason=f"the vllm backend needs vLLM and a GPU: {', '.join(MISSING)}")


class StandInEngine:
    """vLLM's AsyncLLM as far as the backend uses it: `generate` yields cumulative outputs, one per token, every
    `step` seconds, and records the requests it was cancelled on (vLLM aborts those)."""

    def __init__(self, step: float = 0.01) -> None:
        self.step, self.prompts, self.aborted = step, [], []

    async def generate(self, prompt: dict, params, request_id: str):
        self.prompts.append(prompt["prompt_embeds"])
        ids: list[int] = []
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(self.step)
                ids.append(i)
                yield SimpleNamespace(outputs=[SimpleNamespace(
                    text="".join(f" w{t}" for t in ids), token_ids=list(ids),
                    finish_reason="length" if len(ids) == params.max_tokens else None)])
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise


def stand_in_backend(max_in_flight: int = 8) -> tuple[VllmBackend, StandInEngine]:
    engine = StandInEngine()
    backend = VllmBackend(lambda: engine, dtype=torch.bfloat16, max_in_flight=max_in_flight,
                          make_params=lambda p: SimpleNamespace(max_tokens=p.max_new_tokens))
    return backend, engine


def test_the_soft_prompt_goes_inside_the_embeddings_and_pieces_stream_as_they_come() -> None:
    backend, engine = stand_in_backend()
    soft, prompt = SoftPromptPrefix("loose", torch.randn(4, 32)), torch.randn(3, 32)
    pieces: list[str] = []
    answer = backend.submit(EngineRequest(soft, prompt, GenerationParams(max_new_tokens=5),
                                          on_text=pieces.append)).result(timeout=10)
    assert torch.equal(engine.prompts[0], torch.cat([soft.embeddings, prompt]).to(torch.bfloat16))
    assert answer.text == "".join(pieces) == " w0 w1 w2 w3 w4" and answer.token_ids == (0, 1, 2, 3, 4)
    assert answer.finish_reason == "length"
    backend.close()


def test_a_cancelled_request_is_aborted_in_the_engine() -> None:
    backend, engine = stand_in_backend()
    request = EngineRequest(None, torch.randn(3, 32), GenerationParams(max_new_tokens=500))
    request.on_text = lambda piece: request.cancelled.set()  # its client leaves after the first piece
    answer = backend.submit(request).result(timeout=10)
    assert answer.finish_reason == "cancelled" and len(engine.aborted) == 1
    assert answer.new_tokens < 20  # 500 tokens would take 5 s
    backend.close()


def test_a_request_past_its_deadline_is_aborted_and_fails() -> None:
    backend, engine = stand_in_backend()
    request = EngineRequest(None, torch.randn(3, 32), GenerationParams(max_new_tokens=500),
                            deadline=time.monotonic() + 0.2)
    with pytest.raises(DeadlineExceeded):
        backend.submit(request).result(timeout=10)
    assert len(engine.aborted) == 1
    backend.close()


def test_the_backend_takes_at_most_its_bound_in_flight() -> None:
    backend, _ = stand_in_backend(max_in_flight=2)
    running = [backend.submit(EngineRequest(None, torch.randn(3, 32), GenerationParams(max_new_tokens=20)))
               for _ in range(2)]
    with pytest.raises(Overloaded):
        backend.submit(EngineRequest(None, torch.randn(3, 32), GenerationParams(max_new_tokens=2)))
    for answer in running:
        answer.result(timeout=10)
    time.sleep(0.05)  # the done callbacks ran
    backend.submit(EngineRequest(None, torch.randn(3, 32), GenerationParams(max_new_tokens=2))).result(timeout=10)
    backend.close()


@needs_vllm_gpu
def test_vllm_answers_as_the_transformers_backend_greedy_with_a_soft_prompt(tmp_path) -> None:
    from vllm import AsyncEngineArgs, AsyncLLMEngine

    runner = tiny_runner(hidden=64)
    runner.model.save_pretrained(tmp_path)
    runner.tokenizer.save_pretrained(tmp_path)
    args = AsyncEngineArgs(model=str(tmp_path), enable_prompt_embeds=True, enable_prefix_caching=True,
                           dtype="float32", gpu_memory_utilization=0.3, max_model_len=256, enforce_eager=True)
    backend = VllmBackend(lambda: AsyncLLMEngine.from_engine_args(args), dtype=torch.float32, max_in_flight=8)
    soft = SoftPromptPrefix("loose", torch.randn(20, 64, generator=torch.Generator().manual_seed(1)))
    generator = torch.Generator().manual_seed(0)
    requests = [EngineRequest(soft, torch.randn(3 + i, 64, generator=generator), GenerationParams(max_new_tokens=8))
                for i in range(4)]
    expected = decode(runner, requests, compute_prefix(runner.model, soft.embeddings))
    answers = [backend.submit(r).result(timeout=120) for r in requests]
    assert [a.token_ids for a in answers] == [e.token_ids for e in expected]
    backend.close()
