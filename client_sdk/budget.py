"""A persistent privacy-budget ledger on the device: SQLite for the charges, a separate file for the limits.

Every send is charged *before* its first byte leaves: `reserve` checks the per-prompt and cumulative
limits and records a pending charge in one IMMEDIATE transaction, so two processes cannot both spend
the last of a budget. A charge is keyed by the payload's SHA-256: re-sending the same bytes (a retry)
costs nothing more. Cumulative spending is composed, not added (client_sdk.accounting.composition): a
charge records its private tokens and mechanism, and charges sharing a mechanism compose exactly.

Failing closed. The limits live in `<ledger>.limits.json`, apart from the SQLite file, with the ledger's
random id, which the SQLite file also holds. A ledger whose file vanished, was emptied, replaced or is
corrupt while its limits file says it existed raises `LedgerError`; it never comes back empty and
unlimited. To start over on purpose, the app calls `BudgetLedger.discard(path)`.

Rollback. Both files also hold a generation counter. Every change to the charges advances it in the
SQLite file, in the same durable commit as the change, then in the limits file (atomically replaced),
both under the ledger's file lock. So the SQLite file is never behind the limits file, and the limits
file is at most one behind (a crash between the two writes; the next transaction repairs it). An older
copy of the SQLite file (a device backup restored, on purpose or not) is behind and raises `LedgerError`;
so does a limits file more than one generation behind. Both files restored together from one backup
cannot be told from the real thing on the device.

Pending charges. A send that crashed (or whose outcome is unknown) stays `pending` and counted.
`pending(key)` lists them; `settle(charge_id, sent=...)` resolves one: `sent=True` makes it final,
`sent=False` drops it (only if the app knows the payload never left the device).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from client_sdk.accounting import DEFAULT_DELTA
from client_sdk.accounting import composition
from client_sdk.errors import BudgetExceededError, LedgerError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    ledger_id TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS charges (
    charge_id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent')),
    created REAL NOT NULL,
    tokens INTEGER,
    trials INTEGER,
    p REAL
);
"""
_INDEX = "CREATE INDEX IF NOT EXISTS charges_by_key_p ON charges (key, p)"  # after the columns' migration
_MECHANISM_COLUMNS = (("tokens", "INTEGER"), ("trials", "INTEGER"), ("p", "REAL"))


@dataclass(frozen=True)
class Mechanism:
    """A charge's worst case: `tokens` private tokens of `trials_per_token` Bernoulli(p) trials each."""

    tokens: int
    trials_per_token: int
    p: float


@dataclass(frozen=True)
class Spent:
    """What a key has spent so far (pending and sent charges together), epsilon composed at `delta`."""

    epsilon: float
    delta: float
    charges: int
    private_tokens: int


@dataclass(frozen=True)
class Limits:
    per_prompt_epsilon: float | None
    total_epsilon: float | None
    delta: float = DEFAULT_DELTA


@dataclass(frozen=True)
class PendingCharge:
    """A charge whose send may or may not have completed."""

    charge_id: str
    epsilon: float
    private_tokens: int | None
    created: float


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a rename, a new file, a removal) durable; the server's writes use it too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BudgetLedger:
    """Per-key privacy limits and charges; safe across processes; fails closed (see the module docstring)."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.path = Path(path).expanduser()
        self.limits_path = self.path.with_name(self.path.name + ".limits.json")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger's folder {self.path.parent} ({exc.strerror}); "
                              f"nothing was sent") from exc
        self._timeout = timeout
        self._lock = FileLock(str(self.path.with_name(self.path.name + ".lock")), timeout=timeout)
        with self._locked():
            self.ledger_id = self._open()

    @staticmethod
    def discard(path: str | Path) -> None:
        """Delete a ledger and its limits on purpose (all spending history is lost); the next open starts empty."""
        path = Path(path).expanduser()
        for suffix in ("", "-wal", "-shm", ".limits.json"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The ledger's file lock (one writer of the limits file at a time), its failures as LedgerError."""
        try:
            self._lock.acquire()
        except Timeout as exc:
            raise LedgerError(f"another process has held the ledger's lock {self._lock.lock_file} for over "
                              f"{self._timeout:g} s; nothing was sent") from exc
        except OSError as exc:
            raise LedgerError(f"cannot take the ledger's lock {self._lock.lock_file} ({exc.strerror}): the folder "
                              f"{self.path.parent} must be writable; nothing was sent") from exc
        try:
            yield
        finally:
            self._lock.release()

    # -- opening and failing closed ---------------------------------------------------------------

    def _read_config(self) -> dict | None:
        try:
            config = json.loads(self.limits_path.read_text())
            if (not isinstance(config, dict) or not isinstance(config.get("ledger_id"), str)
                    or not isinstance(config.get("keys"), dict) or not isinstance(config.get("generation", 0), int)):
                raise ValueError("missing fields")
            return config
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as exc:
            raise LedgerError(f"the ledger's limits file {self.limits_path} is unreadable ({exc}); refusing to "
                              f"send. Restore it, or BudgetLedger.discard() the ledger on purpose") from exc

    def _own_config(self) -> dict:
        """The limits file, which must still be this ledger's."""
        config = self._read_config()
        if config is None or config["ledger_id"] != self.ledger_id:
            raise LedgerError(f"the limits file {self.limits_path} vanished or was replaced; refusing")
        return config

    def _write_config(self, config: dict) -> None:
        try:
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as tmp:
                json.dump(config, tmp, indent=2, sort_keys=True)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp.name, self.limits_path)
            fsync_directory(self.path.parent)
        except OSError as exc:
            raise LedgerError(f"cannot write the ledger's limits file {self.limits_path} ({exc.strerror}); "
                              f"nothing was sent") from exc

    def _open(self) -> str:
        config = self._read_config()
        exists = self.path.exists() and self.path.stat().st_size > 0
        if config is not None and not exists:
            raise LedgerError(f"the ledger {self.path} vanished or is empty, but its limits file says it existed "
                              f"(id {config['ledger_id']}); refusing to start over with no spending recorded. "
                              f"Restore the file, or BudgetLedger.discard() it on purpose")
        with self._connect(check_exists=False) as db:  # an error before the COMMIT: closing it rolls back
            db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                db.execute(statement)
            columns = {row[1] for row in db.execute("PRAGMA table_info(charges)")}
            for name, kind in _MECHANISM_COLUMNS:  # ledgers written before composition: basic composition
                if name not in columns:
                    db.execute(f"ALTER TABLE charges ADD COLUMN {name} {kind}")
            db.execute(_INDEX)
            if "generation" not in {row[1] for row in db.execute("PRAGMA table_info(meta)")}:
                db.execute("ALTER TABLE meta ADD COLUMN generation INTEGER NOT NULL DEFAULT 0")
            row = db.execute("SELECT ledger_id, generation FROM meta").fetchone()
            legacy = self._legacy_limits(db)
            if row is None:
                if exists and config is None and legacy is None and db.execute("SELECT 1 FROM charges").fetchone():
                    raise LedgerError(f"the ledger {self.path} has no id and no limits file; refusing to guess")
                ledger_id = uuid.uuid4().hex
                db.execute("INSERT INTO meta (ledger_id) VALUES (?)", (ledger_id,))
            else:
                ledger_id = row[0]
            if config is None:
                if row is not None:
                    raise LedgerError(f"the limits file {self.limits_path} of ledger {self.path} is missing; "
                                      f"refusing to send without its limits. Restore it, or "
                                      f"BudgetLedger.discard() the ledger on purpose")
                self._write_config({"ledger_id": ledger_id, "keys": legacy or {}, "generation": 0})
            elif config["ledger_id"] != ledger_id:
                raise LedgerError(f"the ledger {self.path} (id {ledger_id}) is not the one its limits file "
                                  f"describes (id {config['ledger_id']}): it was replaced; refusing to send")
            else:
                self._check_generation(config, row[1])  # ids equal: the ledger had its row
            db.execute("COMMIT")
        return ledger_id

    def _check_generation(self, config: dict, generation: int) -> None:
        """Compare the SQLite file's generation with the limits file's (see the module docstring); a limits file one
        behind (a crash between the two writes) is brought up to date."""
        recorded = config.get("generation", 0)
        if generation < recorded:
            raise LedgerError(f"the ledger {self.path} is at generation {generation} but its limits file says "
                              f"{recorded}: an older copy of the ledger was restored, and the charges made since are "
                              f"missing from it; refusing to send. Restore the newest copy, or "
                              f"BudgetLedger.discard() the ledger on purpose")
        if generation > recorded + 1:
            raise LedgerError(f"the limits file {self.limits_path} is at generation {recorded} but the ledger is at "
                              f"{generation}: an older copy of the limits file was restored; refusing to send")
        if generation == recorded + 1:
            self._write_config({**config, "generation": generation})

    @staticmethod
    def _legacy_limits(db: sqlite3.Connection) -> dict | None:
        """Limits kept inside the SQLite file by earlier versions, moved to the limits file once (None: no such table)."""
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'limits'").fetchone():
            return None
        rows = db.execute("SELECT key, per_prompt_epsilon, total_epsilon FROM limits").fetchall()
        db.execute("DROP TABLE limits")
        return {k: {"per_prompt_epsilon": pp, "total_epsilon": tot, "delta": DEFAULT_DELTA} for k, pp, tot in rows}

    @contextmanager
    def _connect(self, check_exists: bool = True) -> Iterator[sqlite3.Connection]:
        if check_exists and not (self.path.exists() and self.path.stat().st_size > 0):
            raise LedgerError(f"the ledger {self.path} vanished while in use; refusing to send")
        try:
            db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the ledger {self.path}: {exc}") from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            yield db
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise LedgerError(f"the ledger {self.path} is corrupt or unreadable ({exc}); refusing to send") from exc
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction under the ledger's lock, after checking the ledger's id and generation; one that
        changed anything advances the generation, in the same commit and then in the limits file."""
        with self._locked(), self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT ledger_id, generation FROM meta").fetchone()
                if row is None or row[0] != self.ledger_id:
                    raise LedgerError(f"the ledger {self.path} was replaced while in use; refusing to send")
                config = self._own_config()
                self._check_generation(config, row[1])
                before = db.total_changes
                yield db
                changed = db.total_changes != before
                if changed:
                    db.execute("UPDATE meta SET generation = ?", (row[1] + 1,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            if changed:
                self._write_config({**config, "generation": row[1] + 1})

    # -- limits -------------------------------------------------------------------------------------

    def set_limits(self, key: str, *, per_prompt_epsilon: float | None = None, total_epsilon: float | None = None,
                   delta: float = DEFAULT_DELTA) -> None:
        """Set a key's limits (epsilons at `delta`); None means unlimited. Written atomically to the limits file."""
        for name, value in (("per_prompt_epsilon", per_prompt_epsilon), ("total_epsilon", total_epsilon)):
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        wanted = {"per_prompt_epsilon": per_prompt_epsilon, "total_epsilon": total_epsilon, "delta": delta}
        with self._locked():
            config = self._own_config()
            if config["keys"].get(key) != wanted:
                config["keys"][key] = wanted
                self._write_config(config)

    def limits(self, key: str) -> Limits:
        entry = self._own_config()["keys"].get(key)
        return Limits(**entry) if entry else Limits(None, None)

    # -- spending -----------------------------------------------------------------------------------

    @staticmethod
    def _groups(db: sqlite3.Connection, key: str,
                extra: Mechanism | None = None) -> tuple[composition.Groups, float, float]:
        """The key's charges as composition groups {p: trials}, plus the epsilon and delta of charges recorded
        without a mechanism (composed by adding both)."""
        totals: dict[float, int] = {}
        for p, trials in db.execute("SELECT p, SUM(tokens * trials) FROM charges WHERE key = ? AND p IS NOT NULL "
                                    "GROUP BY p", (key,)):
            totals[p] = int(trials)
        if extra is not None:
            totals[extra.p] = totals.get(extra.p, 0) + extra.tokens * extra.trials_per_token
        eps, delta = db.execute("SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0) FROM charges "
                                "WHERE key = ? AND p IS NULL", (key,)).fetchone()
        return composition.as_groups(totals), float(eps), float(delta)

    def spent(self, key: str) -> Spent:
        """The key's composed epsilon at its limits' delta (pending and sent charges together); charges without a
        mechanism add their epsilon and delta."""
        delta = self.limits(key).delta
        with self._transaction() as db:
            groups, legacy_eps, legacy_delta = self._groups(db, key)
            count, tokens = db.execute("SELECT COUNT(*), COALESCE(SUM(tokens), 0) FROM charges WHERE key = ?",
                                       (key,)).fetchone()
        return Spent(composition.composed_epsilon(groups, delta) + legacy_eps, (delta if groups else 0.0) + legacy_delta,
                     count, tokens)

    def remaining(self, key: str) -> float | None:
        """Epsilon left under the key's cumulative cap (None: no cap)."""
        total = self.limits(key).total_epsilon
        return None if total is None else max(0.0, total - self.spent(key).epsilon)

    def reserve(self, key: str, charge_id: str, epsilon: float, delta: float, mechanism: Mechanism | None = None) -> None:
        """Record a pending charge, or raise BudgetExceededError; a known charge_id is not charged again.

        `mechanism` (the prompt's private tokens and worst case) lets the charge compose tightly; without it the
        charge is added as `epsilon`.
        """
        limits = self.limits(key)
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM charges WHERE charge_id = ?", (charge_id,)).fetchone():
                return
            if limits.per_prompt_epsilon is not None and epsilon > limits.per_prompt_epsilon:
                raise BudgetExceededError(
                    f"this prompt costs epsilon={epsilon:.4g}, over the per-prompt limit "
                    f"{limits.per_prompt_epsilon:.4g} for key {key!r}; nothing was sent"
                )
            if limits.total_epsilon is not None:
                groups, legacy, _ = self._groups(db, key, mechanism)
                added = epsilon if mechanism is None else 0.0
                if not composition.fits(groups, limits.total_epsilon - legacy - added, limits.delta):
                    spent = composition.composed_epsilon(self._groups(db, key)[0], limits.delta) + legacy
                    raise BudgetExceededError(
                        f"this prompt costs epsilon={epsilon:.4g} but key {key!r} has spent {spent:.4g} of "
                        f"{limits.total_epsilon:.4g} (composed); nothing was sent"
                    )
            m = mechanism
            db.execute("INSERT INTO charges VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                       (charge_id, key, epsilon, delta, time.time(), m and m.tokens, m and m.trials_per_token,
                        m and m.p))

    def mark_sent(self, charge_id: str) -> None:
        """The payload reached the server: the charge is final."""
        with self._transaction() as db:
            db.execute("UPDATE charges SET state = 'sent' WHERE charge_id = ?", (charge_id,))

    def release(self, charge_id: str) -> None:
        """Drop a pending charge whose payload provably never left the device (e.g. connection refused)."""
        with self._transaction() as db:
            db.execute("DELETE FROM charges WHERE charge_id = ? AND state = 'pending'", (charge_id,))

    def pending(self, key: str) -> list[PendingCharge]:
        """Charges whose send may or may not have completed (a crash mid-send); they stay counted until settled."""
        with self._transaction() as db:
            rows = db.execute("SELECT charge_id, epsilon, tokens, created FROM charges WHERE key = ? AND "
                              "state = 'pending' ORDER BY created", (key,)).fetchall()
        return [PendingCharge(*row) for row in rows]

    def settle(self, charge_id: str, *, sent: bool) -> None:
        """Resolve a pending charge: `sent=True` keeps it (final), `sent=False` drops it (the app knows the
        payload never left the device). Raises LedgerError if no such pending charge exists."""
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM charges WHERE charge_id = ? AND state = 'pending'",
                              (charge_id,)).fetchone():
                raise LedgerError(f"no pending charge {charge_id!r} in {self.path}")
            if sent:
                db.execute("UPDATE charges SET state = 'sent' WHERE charge_id = ?", (charge_id,))
            else:
                db.execute("DELETE FROM charges WHERE charge_id = ?", (charge_id,))
