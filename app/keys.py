"""Client API keys: stored hashed, checked in constant time, optionally bound to a tenant.

A key looks like `veil_<id>_<secret>`: the id (8 hex digits) finds the record, whose SHA-256 of the whole key is
compared with `hmac.compare_digest`. A key may carry a tenant: requests made with it are served that tenant's
DP soft prompts (no other tenant's are). The key itself is shown once, when it is created, and never stored. Keys live
in a JSON file that `veil keys create|list|revoke` edits atomically and every server process (replicas on one host
share it) rereads when it changes.
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
from filelock import FileLock
from pydantic import BaseModel, Field

from app.files import write_json_atomic
from app.training.dp_soft_prompt import TENANT


class KeyRecord(BaseModel):
    id: str
    name: str
    sha256: str
    created: float = Field(default_factory=time.time)
    revoked: bool = False
    tenant: str | None = Field(None, pattern=TENANT)
    """Whose DP soft prompts requests with this key may be served (None: no tenant's)."""


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The API keys in `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._cache: tuple[tuple | None, dict[str, KeyRecord]] | None = None

    def records(self) -> dict[str, KeyRecord]:
        """Every key record, reread only when the file changed (it is replaced atomically, so a new inode)."""
        with self._lock:
            try:
                stat = self.path.stat()
                version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            except FileNotFoundError:
                version = None
            if self._cache is None or self._cache[0] != version:
                raw = json.loads(self.path.read_text()) if version else {}
                self._cache = (version, {k: KeyRecord(**v) for k, v in raw.items()})
            return self._cache[1]

    def create(self, name: str, tenant: str | None = None) -> tuple[KeyRecord, str]:
        """A new key (for `tenant`, if given): its record and the key itself (shown once, never stored)."""
        with self._editing():
            records = dict(self.records())
            key_id = secrets.token_hex(4)
            while key_id in records:
                key_id = secrets.token_hex(4)
            key = f"veil_{key_id}_{secrets.token_urlsafe(32)}"
            records[key_id] = KeyRecord(id=key_id, name=name, sha256=_digest(key), tenant=tenant)
            self._save(records)
        return records[key_id], key

    def revoke(self, key_id: str) -> KeyRecord:
        with self._editing():
            records = dict(self.records())
            if key_id not in records:
                raise KeyError(key_id)
            records[key_id] = records[key_id].model_copy(update={"revoked": True})
            self._save(records)
        return records[key_id]

    def _editing(self) -> FileLock:
        """Held while a change is read, made and written: two processes editing at once must not lose one edit."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(self.path.with_suffix(".lock"))

    def verify(self, key: str) -> KeyRecord | None:
        """The record of a valid, unrevoked key, else None."""
        parts = key.split("_")
        record = self.records().get(parts[1]) if len(parts) >= 3 and parts[0] == "veil" else None
        expected = record.sha256 if record else _digest("no such key")
        matches = hmac.compare_digest(_digest(key), expected)  # compared even when the id is unknown
        return record if record and matches and not record.revoked else None

    def _save(self, records: dict[str, KeyRecord]) -> None:
        write_json_atomic(self.path, {k: r.model_dump() for k, r in records.items()})


keys_cli = typer.Typer(help="Client API keys of this server (its cache directory).", no_args_is_help=True)


def key_file(settings) -> Path:
    """Where a server (ServerSettings) keeps its client keys."""
    return settings.cache_dir / "api-keys.json"


def _store() -> KeyStore:
    from app.settings import ServerSettings

    return KeyStore(key_file(ServerSettings()))


@keys_cli.command("create")
def create_key(name: str = typer.Option(..., help="who the key is for"),
               tenant: str | None = typer.Option(None, help="the tenant whose DP soft prompts the key may use")) -> None:
    """Create a key and print it (once: only its hash is kept)."""
    try:
        record, key = _store().create(name, tenant)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(f"{key}\n(id {record.id}, for {name!r}; set VEIL_REQUIRE_API_KEY=true for the server to require keys)")


@keys_cli.command("list")
def list_keys() -> None:
    """Every key's id, name, creation time and whether it is revoked (never the key)."""
    for record in _store().records().values():
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.created))
        tenant = f"  tenant {record.tenant}" if record.tenant else ""
        typer.echo(f"{record.id}  {record.name}{tenant}  created {created} UTC{'  REVOKED' if record.revoked else ''}")


@keys_cli.command("revoke")
def revoke_key(key_id: str = typer.Argument(..., help="the key's id (veil_<id>_...)")) -> None:
    """Revoke a key: the server refuses it from its next request."""
    try:
        _store().revoke(key_id)
    except KeyError:
        raise typer.BadParameter(f"no key with id {key_id!r}") from None
    typer.echo(f"revoked {key_id}")
