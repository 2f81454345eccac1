"""The client bundle: tokenizer, chat template and projected tables, fetched once and verified by hash."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.numpy import load, load_file
from tokenizers import Tokenizer

from client_sdk.errors import BundleError
from client_sdk.mechanism import MechanismParams
from client_sdk.schemas import BundleInfo, ProjectionInfo

DEFAULT_CACHE_DIR = Path(os.environ.get("VEIL_CACHE_DIR", Path.home() / ".cache" / "veil"))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_projected_table(source: str | Path | bytes) -> np.ndarray:
    """Read a projected table (safetensors file or bytes): float `table`, or int8 `table` times per-column `scale`."""
    path = "table bytes" if isinstance(source, bytes) else source
    tensors = load(source) if isinstance(source, bytes) else load_file(str(source))
    if "table" not in tensors:
        raise BundleError(f"{path}: no tensor named 'table'")
    table = tensors["table"].astype(np.float32)
    if "scale" in tensors:
        table *= tensors["scale"].astype(np.float32)
    if table.ndim != 2:
        raise BundleError(f"{path}: table must be 2-D (vocab x k), got shape {table.shape}")
    return table


def store_verified(cache_dir: Path, content: bytes, expected_sha256: str, what: str) -> Path:
    """Check a downloaded file's hash and write it atomically into the content-addressed cache."""
    actual = sha256_hex(content)
    if actual != expected_sha256:
        raise BundleError(f"{what}: SHA-256 {actual} does not match the bundle's {expected_sha256}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / expected_sha256
    with tempfile.NamedTemporaryFile(dir=cache_dir, delete=False) as tmp:
        tmp.write(content)
    os.replace(tmp.name, path)
    return path


def files_to_fetch(info: BundleInfo, cache_dir: Path) -> list[tuple[str, str, str]]:
    """(url, sha256, description) of the bundle files not yet in the cache."""
    wanted = [(info.tokenizer_url, info.tokenizer_sha256, "tokenizer.json")]
    wanted += [(p.table_url, p.table_sha256, f"projected table {p.id}") for p in info.projections]
    return [w for w in wanted if not (cache_dir / w[1]).exists()]


@dataclass
class ClientBundle:
    """What the device needs to privatize prompts for one server."""

    info: BundleInfo
    tokenizer: Tokenizer
    tables: dict[str, np.ndarray]
    _template: object = field(default=None, repr=False)

    @classmethod
    def from_cache(cls, info: BundleInfo, cache_dir: Path) -> "ClientBundle":
        """Load a bundle whose files are all in `cache_dir` (see `files_to_fetch`)."""
        tables = {}
        for p in info.projections:
            if p.id != p.table_sha256[:16]:
                raise BundleError(f"projection id {p.id} is not the prefix of its table hash {p.table_sha256}")
            tables[p.id] = load_projected_table(cache_dir / p.table_sha256)
            if tables[p.id].shape != (info.vocab_size, p.dim):
                raise BundleError(f"projected table {p.id} has shape {tables[p.id].shape}, "
                                  f"expected ({info.vocab_size}, {p.dim})")
        tokenizer = Tokenizer.from_file(str(cache_dir / info.tokenizer_sha256))
        template = None
        if info.chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            template = env.from_string(info.chat_template)
        return cls(info=info, tokenizer=tokenizer, tables=tables, _template=template)

    def projection(self, projection_id: str | None = None) -> ProjectionInfo:
        wanted = projection_id or self.info.defaults.projection_id
        for p in self.info.projections:
            if p.id == wanted:
                return p
        raise BundleError(f"unknown projection {wanted!r}; the bundle offers {[p.id for p in self.info.projections]}")

    def mechanism(self, *, mu: float | None = None, bits: int | None = None, projection_id: str | None = None) -> MechanismParams:
        """Mechanism settings for this bundle; unspecified values come from the bundle's defaults."""
        p = self.projection(projection_id)
        return MechanismParams.from_mu(
            mu if mu is not None else self.info.defaults.mu,
            bits=bits if bits is not None else self.info.defaults.bits,
            dim=p.dim,
            clip=p.clip,
        )

    def tokenize(self, prompt: str, chat: bool = True) -> np.ndarray:
        """Token ids of the prompt, after the chat template when the bundle has one and `chat` is on."""
        if chat and self._template is not None:
            text = self._template.render(
                messages=[{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                bos_token=self.info.bos_token or "",
                eos_token=self.info.eos_token or "",
            )
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        else:
            ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise ValueError("the prompt tokenizes to nothing")
        if len(ids) > self.info.max_prompt_tokens:
            raise ValueError(f"the prompt is {len(ids)} tokens, over the server's limit of {self.info.max_prompt_tokens}")
        return np.asarray(ids, dtype=np.int64)
