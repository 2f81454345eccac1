"""The client bundle on its own: projected tables, the hash-addressed cache, URL and hash checks, loading and spans."""

import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save, save_file
from tokenizers import Tokenizer

from client_sdk import BundleError, PolicyError, PrivacyPolicy
from client_sdk.bundle import (MAX_TABLE_BYTES, MAX_TOKENIZER_BYTES, ClientBundle, cached_verified, files_to_fetch,
                               load_projected_table, parse_bundle_info, same_origin_url, sha256_hex, store_verified)
from client_sdk.mechanism import MechanismParams
from client_sdk.spans import Message
from tests.test_client import CLIP, DIM, ID, POLICY, TEMPLATE, FakeServer

BASE = httpx.URL("http://fake")


def cache_bundle(server: FakeServer, cache: Path) -> None:
    """The fake server's bundle files, stored in `cache` as the client would after fetching them."""
    store_verified(cache, server.tokenizer_bytes, server.info.tokenizer_sha256, "tokenizer.json")
    for p in server.info.projections:
        store_verified(cache, server.table_bytes, p.table_sha256, p.id)


def load_bundle(server: FakeServer, cache: Path, chat_templates: tuple[str, ...] = ()) -> ClientBundle:
    cache_bundle(server, cache)
    return ClientBundle.from_cache(server.info, cache, chat_templates)


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def bundle(server: FakeServer, tmp_path: Path) -> ClientBundle:
    return load_bundle(server, tmp_path / "cache")


def test_a_float_table_loads_as_float32_from_bytes_or_a_file(tmp_path) -> None:
    table = np.arange(12, dtype=np.float16).reshape(4, 3)
    save_file({"table": table}, tmp_path / "t.safetensors")
    for source in (save({"table": table}), tmp_path / "t.safetensors", str(tmp_path / "t.safetensors")):
        loaded = load_projected_table(source)
        assert loaded.dtype == np.float32 and np.array_equal(loaded, table.astype(np.float32))


def test_an_int8_table_is_scaled_per_column() -> None:
    levels = np.array([[1, -2], [3, 4]], dtype=np.int8)
    scale = np.array([0.5, 0.25], dtype=np.float16)
    loaded = load_projected_table(save({"table": levels, "scale": scale}))
    assert loaded.dtype == np.float32 and np.array_equal(loaded, [[0.5, -0.5], [1.5, 1.0]])


@pytest.mark.parametrize("tensors", [{"weights": np.zeros((2, 2), np.float32)}, {"table": np.zeros(4, np.float32)},
                                     {"table": np.array([[0.0, np.inf]], np.float32)},
                                     {"table": np.array([[np.nan, 0.0]], np.float32)}])
def test_a_table_that_is_missing_not_2d_or_not_finite_is_refused(tmp_path, tensors) -> None:
    save_file(tensors, tmp_path / "t.safetensors")
    with pytest.raises(BundleError, match="t.safetensors"):  # the error names the file
        load_projected_table(tmp_path / "t.safetensors")
    with pytest.raises(BundleError):
        load_projected_table(save(tensors))


def test_bytes_that_are_not_safetensors_are_refused() -> None:
    with pytest.raises(BundleError, match="not a projected table"):
        load_projected_table(b"not safetensors")


def test_the_bundle_json_is_validated() -> None:
    with pytest.raises(BundleError, match="nothing was sent"):
        parse_bundle_info(b'{"model_id": "fake"}')
    with pytest.raises(BundleError):
        parse_bundle_info(b"<html>")
    assert parse_bundle_info(FakeServer().info.model_dump_json().encode()).model_id == "fake"


def test_same_origin_urls_resolve_against_the_server() -> None:
    assert same_origin_url(httpx.URL("https://fake:8443/api/"), "v1/t", "t") == httpx.URL("https://fake:8443/api/v1/t")
    assert same_origin_url(BASE, "/v1/t", "t") == httpx.URL("http://fake/v1/t")
    with pytest.raises(BundleError, match="origin"):
        same_origin_url(BASE, "http://evil/v1/t", "t")


def test_a_verified_file_is_stored_by_hash_in_a_new_cache_directory(tmp_path) -> None:
    cache = tmp_path / "a" / "b"
    path = store_verified(cache, b"content", sha256_hex(b"content"), "file")
    assert path == cache / sha256_hex(b"content") and path.read_bytes() == b"content"
    store_verified(cache, b"other", sha256_hex(b"other"), "file")  # the directory exists now
    assert sorted(p.name for p in cache.iterdir()) == sorted([sha256_hex(b"content"), sha256_hex(b"other")])


def test_the_temporary_file_is_made_inside_the_cache_so_the_rename_is_atomic(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no such directory"))
    assert store_verified(tmp_path / "cache", b"content", sha256_hex(b"content"), "file").exists()


def test_a_file_not_matching_its_hash_is_not_stored(tmp_path) -> None:
    with pytest.raises(BundleError, match="SHA-256"):
        store_verified(tmp_path, b"tampered", sha256_hex(b"content"), "file")
    with pytest.raises(BundleError, match="not a SHA-256"):
        store_verified(tmp_path, b"content", "../content", "file")
    assert list(tmp_path.iterdir()) == []


def test_a_cached_file_is_returned_only_while_it_matches_its_hash(tmp_path) -> None:
    sha = sha256_hex(b"content")
    assert cached_verified(tmp_path, sha) is None
    store_verified(tmp_path, b"content", sha, "file")
    assert cached_verified(tmp_path, sha) == b"content"
    (tmp_path / sha).write_bytes(b"corrupted")
    assert cached_verified(tmp_path, sha) is None and not (tmp_path / sha).exists()


def test_files_to_fetch_lists_what_the_cache_lacks_with_each_files_size_limit(server, tmp_path) -> None:
    table = server.info.projections[0]
    wanted = files_to_fetch(server.info, BASE, tmp_path)
    assert [(url, sha, limit) for url, sha, _, limit in wanted] == [
        (BASE.join(server.info.tokenizer_url), server.info.tokenizer_sha256, MAX_TOKENIZER_BYTES),
        (BASE.join(table.table_url), table.table_sha256, MAX_TABLE_BYTES)]
    store_verified(tmp_path, server.table_bytes, table.table_sha256, "table")
    assert [sha for _, sha, _, _ in files_to_fetch(server.info, BASE, tmp_path)] == [server.info.tokenizer_sha256]
    cache_bundle(server, tmp_path)
    assert files_to_fetch(server.info, BASE, tmp_path) == []


def test_a_bundle_loads_from_the_cache(bundle, server) -> None:
    pid = server.info.projections[0].id
    assert list(bundle.tables) == [pid] and bundle.tables[pid].shape == (len(ID), DIM)
    assert bundle.tokenizer.token_to_id("paris") == ID["paris"]
    assert bundle.projection().id == bundle.projection(pid).id == pid


def test_a_missing_cached_file_is_refused(server, tmp_path) -> None:
    with pytest.raises(BundleError, match="missing or corrupt"):
        ClientBundle.from_cache(server.info, tmp_path)


def test_a_projection_id_must_prefix_its_table_hash(server, tmp_path) -> None:
    server.info.projections[0].id = "0" * 16
    with pytest.raises(BundleError, match="prefix"):
        load_bundle(server, tmp_path)


def test_a_table_of_the_wrong_shape_is_refused(server, tmp_path) -> None:
    server.info.projections[0].dim = DIM + 1
    with pytest.raises(BundleError, match="shape"):
        load_bundle(server, tmp_path)


def test_a_malformed_tokenizer_is_refused(server, tmp_path) -> None:
    server.tokenizer_bytes = b'{"not": "a tokenizer"}'
    server.info.tokenizer_sha256 = sha256_hex(server.tokenizer_bytes)
    with pytest.raises(BundleError, match="not a tokenizer"):
        load_bundle(server, tmp_path)


def test_a_tokenizer_with_more_tokens_than_the_vocabulary_is_refused(server, tmp_path) -> None:
    tokenizer = Tokenizer.from_str(server.tokenizer_bytes.decode())
    tokenizer.add_tokens(["extra"])  # an added token beyond the table's rows
    server.tokenizer_bytes = tokenizer.to_str().encode()
    server.info.tokenizer_sha256 = sha256_hex(server.tokenizer_bytes)
    with pytest.raises(BundleError, match="more than the bundle's vocabulary"):
        load_bundle(server, tmp_path)


def test_an_unknown_chat_template_is_refused_for_chat_and_allowed_without(server, tmp_path) -> None:
    server.info.chat_template = TEMPLATE + " "
    bundle = load_bundle(server, tmp_path)
    with pytest.raises(BundleError, match="not one this SDK renders"):
        bundle.spans([Message("user", "paris")])
    assert [s.ids.tolist() for s in bundle.spans([Message("user", "paris")], chat=False)] == [[ID["paris"]]]
    vetted = load_bundle(server, tmp_path, chat_templates=(TEMPLATE + " ",))
    assert len(vetted.spans([Message("user", "paris")])) == 3


def test_a_vetted_template_renders_as_hugging_face_does_trimming_block_whitespace(server, tmp_path) -> None:
    server.info.chat_template = "  {% for m in messages %}\n{{ m['content'] }}|\n  {% endfor %}\n"
    bundle = load_bundle(server, tmp_path, chat_templates=(server.info.chat_template,))
    assert bundle._template.render(messages=[{"content": "a"}, {"content": "b"}]) == "a|\nb|\n"


def test_the_template_gets_the_bundles_bos_and_eos_tokens(server, tmp_path) -> None:
    server.info.chat_template = "{{ bos_token }} {% for m in messages %}{{ m['content'] }}{% endfor %} {{ eos_token }}"
    server.info.bos_token, server.info.eos_token = "<|im_start|>", "<|im_end|>"
    bundle = load_bundle(server, tmp_path, chat_templates=(server.info.chat_template,))
    assert bundle.tokenize("paris").tolist() == [ID["<|im_start|>"], ID["paris"], ID["<|im_end|>"]]
    server.info.bos_token = server.info.eos_token = None
    assert bundle.tokenize("paris").tolist() == [ID["paris"]]  # no tokens, not the text "None"


def test_tokenize_without_chat_skips_the_template(bundle) -> None:
    assert bundle.tokenize("the capital").tolist() == [ID["<|im_start|>"], ID["user"], ID["the"], ID["capital"],
                                                      ID["<|im_end|>"], ID["<|im_start|>"], ID["assistant"]]
    assert bundle.tokenize("the capital", chat=False).tolist() == [ID["the"], ID["capital"]]


def test_a_prompt_of_one_token_up_to_the_servers_limit_is_accepted(bundle, server) -> None:
    assert [s.ids.tolist() for s in bundle.spans([Message("user", "paris")], chat=False)] == [[ID["paris"]]]
    server.info.max_prompt_tokens = 3
    assert len(bundle.tokenize("the capital of", chat=False)) == 3
    with pytest.raises(ValueError, match="over the server's limit"):
        bundle.tokenize("the capital of france", chat=False)
    with pytest.raises(ValueError, match="nothing"):
        bundle.tokenize("", chat=False)


def test_an_unknown_projection_is_refused(bundle) -> None:
    with pytest.raises(BundleError, match="unknown projection"):
        bundle.projection("0" * 16)


def test_the_mechanism_follows_the_apps_settings_and_refuses_a_looser_suggestion(bundle, server) -> None:
    pid = server.info.projections[0].id
    assert bundle.mechanism(POLICY) == MechanismParams.from_mu(5.0, bits=4, dim=DIM, clip=CLIP)
    assert bundle.mechanism(POLICY, mu=2.0, bits=2, projection_id=pid) == MechanismParams.from_mu(2.0, bits=2, dim=DIM,
                                                                                                  clip=CLIP)
    with pytest.raises(BundleError, match="unknown projection"):
        bundle.mechanism(POLICY, projection_id="0" * 16)
    server.info.defaults.mu = 50.0
    with pytest.raises(PolicyError, match="looser"):
        bundle.mechanism(POLICY)
    assert bundle.mechanism(POLICY, allow_looser_bundle=True).mu_clt <= 5.0 + 1e-6
    assert bundle.mechanism(PrivacyPolicy(epsilon_per_token=1e9)).mu_clt == pytest.approx(50.0)


def test_a_bundle_without_a_chat_template_tokenizes_chat_prompts_without_one(server, tmp_path) -> None:
    server.info.chat_template = None
    bundle = load_bundle(server, tmp_path)
    assert bundle.tokenize("the capital").tolist() == [ID["the"], ID["capital"]]
