"""Shared fixtures: a tiny randomly initialised Llama (seconds, no download) served in process or on loopback."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from app.model_runner import ModelRunner
from client_sdk.policy import PrivacyPolicy
from client_sdk.templates import SHIPPED

PERMISSIVE = PrivacyPolicy(epsilon_per_token=1e9)
"""A policy that allows any mu, for tests of the server's behaviour at loose settings."""

WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "the", "capital", "of", "france", "is",
         "paris", "a", "city", "and", "river", "hello", "world", "what", "?", "."]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_runner(hidden: int = 32) -> ModelRunner:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return ModelRunner(LlamaForCausalLM(config), tiny_tokenizer(), model_id="tiny-llama")


@pytest.fixture(scope="session")
def runner() -> ModelRunner:
    return tiny_runner()


class LoopbackServer:
    """A real uvicorn server on 127.0.0.1 in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def settings(tmp_path: Path):
    from app.settings import ServerSettings

    return ServerSettings(cache_dir=tmp_path / "cache", soft_prompt_dir=tmp_path / "soft_prompts",
                          projection_dir=tmp_path / "projections", data_dir=tmp_path / "data",
                          projection_dim=8, clip=2.0, default_mu=4.0, max_prompt_tokens=64, max_new_tokens=32)


@pytest.fixture(autouse=True)
def tiny_template_is_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model's chat template is rendered as a shipped one would be (client_sdk.templates)."""
    monkeypatch.setitem(SHIPPED, "tiny test model", CHAT_TEMPLATE)


@pytest.fixture(autouse=True)
def private_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's default client ledger (platformdirs' user data directory) lives in its own temporary folder."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    return tmp_path / "xdg-data"


@pytest.fixture
def client_cache(tmp_path: Path) -> Path:
    return tmp_path / "client-cache"


@pytest.fixture
def loopback(settings, runner) -> Iterator[LoopbackServer]:
    from app.api import create_app

    with LoopbackServer(create_app(settings, runner=runner)) as server:
        yield server
