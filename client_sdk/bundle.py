"""The client bundle: tokenizer, chat template and projected tables, fetched once and verified by hash."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import httpx
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load, load_file
from tokenizers import Tokenizer

from client_sdk.errors import BundleError
from client_sdk.mechanism import MechanismParams
from client_sdk.policy import PrivacyPolicy
from client_sdk.schemas import BundleInfo, ProjectionInfo
from client_sdk.spans import Conversation, Message, TokenSpan, as_messages, token_spans
from client_sdk.templates import SHIPPED, known_templates, template_sha256

DEFAULT_CACHE_DIR = Path(os.environ.get("VEIL_CACHE_DIR", Path.home() / ".cache" / "veil"))
MAX_BUNDLE_INFO_BYTES = 1 << 20
"""GET /v1/bundle's JSON (with the chat template inline)."""
MAX_TOKENIZER_BYTES = 32 << 20
"""tokenizer.json (SmolLM2's is 2 MiB, Llama 3's 9 MiB)."""
MAX_TABLE_BYTES = 128 << 20
"""A projected table (SmolLM2's at k = 72, float16: 7 MiB)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_projected_table(source: str | Path | bytes) -> np.ndarray:
    """Read a projected table (safetensors file or bytes): float `table`, or int8 `table` times per-column `scale`."""
    path = "table bytes" if isinstance(source, bytes) else source
    try:
        tensors = load(source) if isinstance(source, bytes) else load_file(str(source))
        table = tensors["table"].astype(np.float32)
        if "scale" in tensors:
            table *= tensors["scale"].astype(np.float32)
    except KeyError:
        raise BundleError(f"{path}: no tensor named 'table'") from None
    except (SafetensorError, ValueError, TypeError) as err:
        raise BundleError(f"{path}: not a projected table in safetensors ({err})") from None
    if table.ndim != 2:
        raise BundleError(f"{path}: table must be 2-D (vocab x k), got shape {table.shape}")
    if not np.isfinite(table).all():
        raise BundleError(f"{path}: the table holds values that are not finite")
    return table


HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_sha256(value: str, what: str) -> str:
    """A bundle's hash, checked to be 64 lowercase hex characters before it names a file in the cache."""
    if not HEX_SHA256.fullmatch(value):
        raise BundleError(f"{what}: {value!r} is not a SHA-256 in hex")
    return value


def parse_bundle_info(content: bytes) -> BundleInfo:
    """GET /v1/bundle's body, validated; anything else than the API's JSON is a BundleError."""
    try:
        return BundleInfo.model_validate_json(content)
    except ValidationError as err:
        raise BundleError(f"the server's bundle is not the API's JSON ({err.error_count()} problems, first: "
                          f"{err.errors()[0]['loc']}: {err.errors()[0]['msg']}); nothing was sent") from None


def same_origin_url(base_url: httpx.URL, url: str, what: str) -> httpx.URL:
    """`url` resolved against the server's URL; refused unless it stays on the server's own origin
    (scheme, host and port), so the client's API key is never sent anywhere else."""
    resolved = base_url.join(url)
    if (resolved.scheme, resolved.host, resolved.port) != (base_url.scheme, base_url.host, base_url.port):
        raise BundleError(f"{what}: the bundle points at {url!r}, outside the server's origin {base_url}; refusing")
    return resolved


def store_verified(cache_dir: Path, content: bytes, expected_sha256: str, what: str) -> Path:
    """Check a downloaded file's hash and write it atomically and durably into the content-addressed cache."""
    actual = sha256_hex(content)
    if actual != check_sha256(expected_sha256, what):
        raise BundleError(f"{what}: SHA-256 {actual} does not match the bundle's {expected_sha256}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / expected_sha256
    with tempfile.NamedTemporaryFile(dir=cache_dir, delete=False) as tmp:
        tmp.write(content)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)
    return path


def cached_verified(cache_dir: Path, sha256: str) -> bytes | None:
    """A cached file's bytes if present and still matching its hash; a corrupted one is removed (fetched again)."""
    path = cache_dir / sha256
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return None
    if sha256_hex(content) != sha256:
        path.unlink(missing_ok=True)
        return None
    return content


def files_to_fetch(info: BundleInfo, base_url: httpx.URL,
                   cache_dir: Path) -> list[tuple[httpx.URL, str, str, int]]:
    """(url, sha256, description, size limit) of the bundle files not yet in the cache (or no longer matching
    their hash).

    Every hash and URL is checked first: hashes are hex, URLs stay on the server's origin."""
    wanted = [(info.tokenizer_url, info.tokenizer_sha256, "tokenizer.json", MAX_TOKENIZER_BYTES)]
    wanted += [(p.table_url, p.table_sha256, f"projected table {p.id}", MAX_TABLE_BYTES) for p in info.projections]
    checked = [(same_origin_url(base_url, url, what), check_sha256(sha, what), what, limit)
               for url, sha, what, limit in wanted]
    return [w for w in checked if cached_verified(cache_dir, w[1]) is None]


def _verified(cache_dir: Path, sha256: str) -> bytes:
    content = cached_verified(cache_dir, sha256)
    if content is None:
        raise BundleError(f"cached file {sha256} is missing or corrupt; fetch the bundle again")
    return content


@dataclass
class ClientBundle:
    """What the device needs to privatize prompts for one server."""

    info: BundleInfo
    tokenizer: Tokenizer
    tables: dict[str, np.ndarray]
    _template: object = field(default=None, repr=False)

    @classmethod
    def from_cache(cls, info: BundleInfo, cache_dir: Path, chat_templates: Iterable[str] = ()) -> "ClientBundle":
        """Load a bundle whose files are all in `cache_dir` (see `files_to_fetch`). The bundle's chat template is
        rendered only if it is one the SDK ships or one of the app's `chat_templates` (see client_sdk.templates)."""
        tables = {}
        for p in info.projections:
            if p.id != p.table_sha256[:16]:
                raise BundleError(f"projection id {p.id} is not the prefix of its table hash {p.table_sha256}")
            tables[p.id] = load_projected_table(_verified(cache_dir, p.table_sha256))
            if tables[p.id].shape != (info.vocab_size, p.dim):
                raise BundleError(f"projected table {p.id} has shape {tables[p.id].shape}, "
                                  f"expected ({info.vocab_size}, {p.dim})")
        try:
            tokenizer = Tokenizer.from_str(_verified(cache_dir, info.tokenizer_sha256).decode())
        except Exception as err:  # the tokenizers library raises plain Exception on a malformed file
            raise BundleError(f"tokenizer.json is not a tokenizer ({str(err)[:200]})") from None
        if tokenizer.get_vocab_size(with_added_tokens=True) > info.vocab_size:
            raise BundleError(f"the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, more "
                              f"than the bundle's vocabulary of {info.vocab_size}")
        template = None
        if info.chat_template and (text := known_templates(chat_templates).get(template_sha256(info.chat_template))):
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            template = env.from_string(text)
        return cls(info=info, tokenizer=tokenizer, tables=tables, _template=template)

    def projection(self, projection_id: str | None = None) -> ProjectionInfo:
        wanted = projection_id or self.info.defaults.projection_id
        for p in self.info.projections:
            if p.id == wanted:
                return p
        raise BundleError(f"unknown projection {wanted!r}; the bundle offers {[p.id for p in self.info.projections]}")

    def mechanism(self, policy: PrivacyPolicy, *, mu: float | None = None, bits: int | None = None,
                  projection_id: str | None = None, allow_looser_bundle: bool = False) -> MechanismParams:
        """Mechanism settings for this bundle under the device's policy; the bundle's defaults are suggestions."""
        p = self.projection(projection_id)
        return policy.choose(dim=p.dim, clip=p.clip, bits=bits, mu=mu, suggested_bits=self.info.defaults.bits,
                             suggested_mu=self.info.defaults.mu, allow_looser_suggestion=allow_looser_bundle)

    def spans(self, messages: list[Message], *, chat: bool = True,
              conversation: Conversation | None = None) -> list[TokenSpan]:
        """The prompt's public and private token spans, after the chat template when the bundle has one and
        `chat` is on (see client_sdk.spans)."""
        if chat and self.info.chat_template and self._template is None:
            raise BundleError(f"the server's chat template (SHA-256 {template_sha256(self.info.chat_template)}) is "
                              f"not one this SDK renders (it ships those of {', '.join(SHIPPED)}); nothing was sent. "
                              f"Pass chat=False, or the template's text as chat_templates=[...] once you have "
                              f"vetted it")
        spans = token_spans(self.tokenizer, messages, template=self._template if chat else None,
                            bos=self.info.bos_token or "", eos=self.info.eos_token or "", conversation=conversation)
        total = sum(len(s.ids) for s in spans)
        if total == 0:
            raise ValueError("the prompt tokenizes to nothing")
        if total > self.info.max_prompt_tokens:
            raise ValueError(f"the prompt is {total} tokens, over the server's limit of {self.info.max_prompt_tokens}")
        return spans

    def tokenize(self, prompt: str | list[Message], chat: bool = True) -> np.ndarray:
        """Token ids of the whole prompt, every span in order."""
        return np.concatenate([s.ids for s in self.spans(as_messages(prompt), chat=chat)])
