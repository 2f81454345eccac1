"""The transformers backend on the tiny model: the soft prompt's cached keys and values give the same answers as
running the soft prompt with every prompt (transformers' own `generate` on the concatenated embeddings), batched
and alone; the cache is computed once per artifact version; stop strings are matched on decoded text. Which backend
serves by default (the llama.cpp backend's own tests: tests/test_llamacpp.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app.engine import llamacpp, prefix_cache
from app.engine.load import backend_name
from app.engine.prefix_cache import PrefixCache
from app.engine.request import EngineRequest, GenerationParams, SoftPromptPrefix
from app.engine.text import TextStream, check_stop
from app.engine.transformers import TransformersBackend, decode
from app.settings import ServerSettings
from tests.conftest import tiny_runner


@pytest.fixture
def runner():
    runner = tiny_runner()
    runner.model.generation_config.eos_token_id = None  # every answer runs to max_new_tokens: more to compare
    with torch.no_grad():  # sharpen the random model's attention, so that a wrong position or mask changes answers
        for layer in runner.model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return runner


def prompts(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2 + 3 * i, 32, generator=generator) for i in range(count)]  # all different lengths


def reference(runner, soft: torch.Tensor, embeds: list[torch.Tensor], new_tokens: int) -> list[tuple[int, ...]]:
    """transformers' generate() on [soft prompt; prompt], left-padded as one batch, with no cache carried over."""
    full = [torch.cat([soft, e]) for e in embeds]
    length = max(f.shape[0] for f in full)
    batch = torch.zeros(len(full), length, 32)
    mask = torch.zeros(len(full), length, dtype=torch.long)
    for i, f in enumerate(full):
        batch[i, length - f.shape[0]:], mask[i, length - f.shape[0]:] = f, 1
    with torch.inference_mode():
        out = runner.model.generate(inputs_embeds=batch, attention_mask=mask, max_new_tokens=new_tokens,
                                    do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    return [tuple(row.tolist()) for row in out]


@pytest.mark.parametrize("batch", [1, 4])
def test_the_cached_soft_prompt_answers_as_the_soft_prompt_run_with_each_prompt(runner, batch) -> None:
    soft = SoftPromptPrefix("loose", torch.randn(5, 32, generator=torch.Generator().manual_seed(1)))
    embeds = prompts(batch)
    expected = reference(runner, soft.embeddings, embeds, new_tokens=12)
    cache = PrefixCache(runner.model)
    requests = [EngineRequest(soft, e, GenerationParams(max_new_tokens=12)) for e in embeds]
    answers = decode(runner, requests, cache.get(soft))
    assert [a.token_ids for a in answers] == expected
    # and batched answers equal each prompt alone
    assert [decode(runner, [r], cache.get(soft))[0].token_ids for r in requests] == expected


def test_the_backend_computes_each_soft_prompts_keys_and_values_once(runner, monkeypatch) -> None:
    computed = []
    original = prefix_cache.compute_prefix
    monkeypatch.setattr(prefix_cache, "compute_prefix", lambda model, e: computed.append(e) or original(model, e))
    backend = TransformersBackend(runner, max_batch=4, window=0.05, max_queue=16)
    loose = SoftPromptPrefix("loose", torch.randn(4, 32))
    answers = [backend.submit(EngineRequest(loose, e, GenerationParams(max_new_tokens=3))) for e in prompts(6)]
    assert all(a.result(timeout=60).new_tokens == 3 for a in answers)
    assert len(computed) == 1
    reloaded = SoftPromptPrefix("loose", loose.embeddings.clone() + 1)  # a new version under the same name
    backend.submit(EngineRequest(reloaded, prompts(1)[0], GenerationParams(max_new_tokens=2))).result(timeout=60)
    assert len(computed) == 2 and computed[1] is reloaded.embeddings
    backend.close()


def test_stop_strings_end_generation_on_the_decoded_text_without_transformers_stop_string_tables(
        runner, monkeypatch) -> None:
    import transformers.generation.stopping_criteria as criteria

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' StopStringCriteria was built")

    monkeypatch.setattr(criteria.StopStringCriteria, "__init__", refuse)
    embeds = prompts(1)[0]
    full = decode(runner, [EngineRequest(None, embeds, GenerationParams(max_new_tokens=12))])[0]
    words = full.text.split()
    stop = " ".join(words[3:5])  # spans two tokens
    cut = decode(runner, [EngineRequest(None, embeds, GenerationParams(max_new_tokens=12, stop=(stop, "zzz")))])[0]
    assert cut.text == full.text[: full.text.index(stop)]
    completing = next(k for k in range(1, 13) if stop in runner.tokenizer.decode(full.token_ids[:k]))
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[:completing]  # stopped right there


def test_a_text_stream_holds_back_what_may_begin_a_stop_string(runner) -> None:
    vocab = runner.tokenizer.get_vocab()
    stream = TextStream(runner.tokenizer, ("paris is a", "river"))
    sent = []
    for word in ["the", "capital", "paris", "is", "a", "city"]:
        stopped = stream.push(vocab[word])
        sent.append(stream.take(finished=stopped))
        if stopped:
            break
    assert sent == ["the", " capital", " ", "", ""] and stream.final_text == "the capital "


def test_stop_strings_are_bounded_in_tokens_and_characters(runner) -> None:
    tokenizer = runner.tokenizer
    assert check_stop(("the city", "."), tokenizer) is None
    assert "tokens" in check_stop((" ".join(["paris"] * 33),), tokenizer)
    assert "characters" in check_stop(("x" * 1000,), tokenizer)
    assert "at most 8" in check_stop(("a",) * 9, tokenizer)


@pytest.mark.parametrize(("model_id", "installed", "settings", "expected"), [
    ("smollm2", True, {}, "llamacpp"),
    ("smollm2", False, {}, "transformers"),
    ("smollm2", True, {"device": "cuda"}, "transformers"),
    ("tiny-llama", True, {}, "transformers"),  # not a GGUF
    ("smollm2", True, {"backend": "transformers"}, "transformers"),
    ("tiny-llama", False, {"backend": "llamacpp"}, "llamacpp"),  # named: loading it says what is wrong
])
def test_llamacpp_is_the_default_on_cpu_when_installed_and_the_model_is_a_gguf(monkeypatch, model_id, installed,
                                                                               settings, expected) -> None:
    monkeypatch.setattr(llamacpp, "available", lambda: installed)
    monkeypatch.setattr("app.engine.load.gguf_path", lambda spec: Path("x.gguf") if spec == "smollm2" else None)
    assert backend_name(SimpleNamespace(model_id=model_id), ServerSettings(**settings)) == expected
