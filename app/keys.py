"""Client API keys (stored hashed, checked in constant time) and a per-key rate limit.

A key looks like `veil_<id>_<secret>`: the id (8 hex digits) finds the record, whose SHA-256 of the whole key is
compared with `hmac.compare_digest`. The key itself is shown once, when it is created, and never stored. Keys live
in a JSON file that `veil keys create|list|revoke` edits atomically and the server rereads when it changes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from pathlib import Path

import typer
from pydantic import BaseModel, Field

from app.files import write_json_atomic


class KeyRecord(BaseModel):
    id: str
    name: str
    sha256: str
    created: float = Field(default_factory=time.time)
    revoked: bool = False


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The API keys in `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._cache: tuple[float, dict[str, KeyRecord]] | None = None

    def records(self) -> dict[str, KeyRecord]:
        """Every key record, reread only when the file changed."""
        with self._lock:
            mtime = self.path.stat().st_mtime if self.path.exists() else 0.0
            if self._cache is None or self._cache[0] != mtime:
                raw = json.loads(self.path.read_text()) if self.path.exists() else {}
                self._cache = (mtime, {k: KeyRecord(**v) for k, v in raw.items()})
            return self._cache[1]

    def create(self, name: str) -> tuple[KeyRecord, str]:
        """A new key: its record and the key itself (shown once, never stored)."""
        records = dict(self.records())
        key_id = secrets.token_hex(4)
        while key_id in records:
            key_id = secrets.token_hex(4)
        key = f"veil_{key_id}_{secrets.token_urlsafe(32)}"
        records[key_id] = KeyRecord(id=key_id, name=name, sha256=_digest(key))
        self._save(records)
        return records[key_id], key

    def revoke(self, key_id: str) -> KeyRecord:
        records = dict(self.records())
        if key_id not in records:
            raise KeyError(key_id)
        records[key_id] = records[key_id].model_copy(update={"revoked": True})
        self._save(records)
        return records[key_id]

    def verify(self, key: str) -> KeyRecord | None:
        """The record of a valid, unrevoked key, else None."""
        parts = key.split("_")
        record = self.records().get(parts[1]) if len(parts) >= 3 and parts[0] == "veil" else None
        expected = record.sha256 if record else _digest("no such key")
        matches = hmac.compare_digest(_digest(key), expected)  # compared even when the id is unknown
        return record if record and matches and not record.revoked else None

    def _save(self, records: dict[str, KeyRecord]) -> None:
        write_json_atomic(self.path, {k: r.model_dump() for k, r in records.items()})


MAX_CALLERS = 100_000


class RateLimiter:
    """A token bucket per caller: `per_minute` requests a minute, in bursts of up to `per_minute`."""

    def __init__(self, per_minute: int) -> None:
        self.rate, self.capacity = per_minute / 60.0, float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, caller: str) -> float:
        """0 if the caller may go now, else the seconds until they may (for Retry-After)."""
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) > MAX_CALLERS:  # forget callers whose bucket has refilled: they start full anyway
                full = self.capacity / self.rate
                self._buckets = {c: b for c, b in self._buckets.items() if now - b[1] < full}
            tokens, last = self._buckets.get(caller, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[caller] = (tokens - 1, now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            return (1 - tokens) / self.rate


keys_cli = typer.Typer(help="Client API keys of this server (its cache directory).", no_args_is_help=True)


def key_file(settings) -> Path:
    """Where a server (ServerSettings) keeps its client keys."""
    return settings.cache_dir / "api-keys.json"


def _store() -> KeyStore:
    from app.settings import ServerSettings

    return KeyStore(key_file(ServerSettings()))


@keys_cli.command("create")
def create_key(name: str = typer.Option(..., help="who the key is for")) -> None:
    """Create a key and print it (once: only its hash is kept)."""
    record, key = _store().create(name)
    typer.echo(f"{key}\n(id {record.id}, for {name!r}; set VEIL_REQUIRE_API_KEY=true for the server to require keys)")


@keys_cli.command("list")
def list_keys() -> None:
    """Every key's id, name, creation time and whether it is revoked (never the key)."""
    for record in _store().records().values():
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.created))
        typer.echo(f"{record.id}  {record.name}  created {created} UTC{'  REVOKED' if record.revoked else ''}")


@keys_cli.command("revoke")
def revoke_key(key_id: str = typer.Argument(..., help="the key's id (veil_<id>_...)")) -> None:
    """Revoke a key: the server refuses it from its next request."""
    try:
        _store().revoke(key_id)
    except KeyError:
        raise typer.BadParameter(f"no key with id {key_id!r}") from None
    typer.echo(f"revoked {key_id}")
