"""A persistent privacy-budget ledger on the device (SQLite).

Every send is charged *before* its first byte leaves: `reserve` checks the per-prompt and
cumulative limits and records a pending charge in one IMMEDIATE transaction, so two processes
cannot both spend the last of a budget. A charge is keyed by the payload's SHA-256: re-sending the
same bytes (a retry) costs nothing more, and a crash mid-send leaves the charge counted, never lost.
Cumulative spending composes by the basic theorem: epsilons add and deltas add.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from client_sdk.errors import BudgetExceededError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS limits (
    key TEXT PRIMARY KEY,
    per_prompt_epsilon REAL,
    total_epsilon REAL
);
CREATE TABLE IF NOT EXISTS charges (
    charge_id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent')),
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_by_key ON charges (key);
"""


@dataclass(frozen=True)
class Spent:
    """What a key has spent so far (pending and sent charges together)."""

    epsilon: float
    delta: float
    charges: int


@dataclass(frozen=True)
class Limits:
    per_prompt_epsilon: float | None
    total_epsilon: float | None


class BudgetLedger:
    """Per-key privacy limits and charges in one SQLite file; safe across processes."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._timeout = timeout
        with self._transaction() as db:
            for statement in _SCHEMA.split(";"):
                db.execute(statement)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def set_limits(self, key: str, *, per_prompt_epsilon: float | None = None, total_epsilon: float | None = None) -> None:
        """Set a key's limits; None means unlimited."""
        for name, value in (("per_prompt_epsilon", per_prompt_epsilon), ("total_epsilon", total_epsilon)):
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        with self._transaction() as db:
            db.execute(
                "INSERT INTO limits VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                "per_prompt_epsilon = excluded.per_prompt_epsilon, total_epsilon = excluded.total_epsilon",
                (key, per_prompt_epsilon, total_epsilon),
            )

    def limits(self, key: str) -> Limits:
        with self._transaction() as db:
            row = db.execute("SELECT per_prompt_epsilon, total_epsilon FROM limits WHERE key = ?", (key,)).fetchone()
        return Limits(*row) if row else Limits(None, None)

    @staticmethod
    def _spent(db: sqlite3.Connection, key: str) -> Spent:
        eps, delta, count = db.execute(
            "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0), COUNT(*) FROM charges WHERE key = ?", (key,)
        ).fetchone()
        return Spent(eps, delta, count)

    def spent(self, key: str) -> Spent:
        with self._transaction() as db:
            return self._spent(db, key)

    def reserve(self, key: str, charge_id: str, epsilon: float, delta: float) -> None:
        """Record a pending charge, or raise BudgetExceededError; a known charge_id is not charged again."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM charges WHERE charge_id = ?", (charge_id,)).fetchone():
                return
            row = db.execute("SELECT per_prompt_epsilon, total_epsilon FROM limits WHERE key = ?", (key,)).fetchone()
            limits = Limits(*row) if row else Limits(None, None)
            if limits.per_prompt_epsilon is not None and epsilon > limits.per_prompt_epsilon:
                raise BudgetExceededError(
                    f"this prompt costs epsilon={epsilon:.4g}, over the per-prompt limit "
                    f"{limits.per_prompt_epsilon:.4g} for key {key!r}; nothing was sent"
                )
            spent = self._spent(db, key)
            if limits.total_epsilon is not None and spent.epsilon + epsilon > limits.total_epsilon:
                raise BudgetExceededError(
                    f"this prompt costs epsilon={epsilon:.4g} but key {key!r} has "
                    f"{limits.total_epsilon - spent.epsilon:.4g} of {limits.total_epsilon:.4g} left; nothing was sent"
                )
            db.execute(
                "INSERT INTO charges VALUES (?, ?, ?, ?, 'pending', ?)", (charge_id, key, epsilon, delta, time.time())
            )

    def mark_sent(self, charge_id: str) -> None:
        """The payload reached the server: the charge is final."""
        with self._transaction() as db:
            db.execute("UPDATE charges SET state = 'sent' WHERE charge_id = ?", (charge_id,))

    def release(self, charge_id: str) -> None:
        """Drop a pending charge whose payload provably never left the device (e.g. connection refused)."""
        with self._transaction() as db:
            db.execute("DELETE FROM charges WHERE charge_id = ? AND state = 'pending'", (charge_id,))

    def pending(self, key: str) -> list[str]:
        """Charges whose send may or may not have completed (a crash mid-send); they stay counted."""
        with self._transaction() as db:
            rows = db.execute("SELECT charge_id FROM charges WHERE key = ? AND state = 'pending'", (key,)).fetchall()
        return [r[0] for r in rows]
