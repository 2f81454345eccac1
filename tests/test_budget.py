"""The device's budget ledger: limits, idempotent charges, two writers at once, a crash mid-send."""

import errno
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from filelock import FileLock

from client_sdk import budget
from client_sdk.accounting import DEFAULT_DELTA, composition
from client_sdk.budget import BudgetLedger, Limits, Mechanism
from client_sdk.errors import BudgetExceededError, LedgerError


def test_per_prompt_and_total_limits(tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.set_limits("alice", per_prompt_epsilon=10.0, total_epsilon=25.0)
    with pytest.raises(BudgetExceededError, match="per-prompt"):
        ledger.reserve("alice", "big", 11.0, 1e-5)
    ledger.reserve("alice", "a", 10.0, 1e-5)
    ledger.reserve("alice", "b", 10.0, 1e-5)
    with pytest.raises(BudgetExceededError, match="spent 20 of 25"):
        ledger.reserve("alice", "c", 10.0, 1e-5)
    ledger.reserve("alice", "d", 5.0, 1e-5)
    spent = ledger.spent("alice")
    assert spent.epsilon == pytest.approx(25.0) and spent.delta == pytest.approx(3e-5) and spent.charges == 3
    assert ledger.spent("bob").epsilon == 0 and ledger.limits("bob").total_epsilon is None


def test_same_payload_is_charged_once_and_release_drops_only_pending(tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.reserve("k", "payload-hash", 3.0, 1e-5)
    ledger.reserve("k", "payload-hash", 3.0, 1e-5)  # a retry of the same bytes
    assert ledger.spent("k").epsilon == 3.0
    ledger.mark_sent("payload-hash")
    ledger.release("payload-hash")  # too late: it was sent
    assert ledger.spent("k").epsilon == 3.0
    ledger.reserve("k", "never-sent", 2.0, 1e-5)
    ledger.release("never-sent")
    assert ledger.spent("k").epsilon == 3.0 and ledger.pending("k") == []


def test_pending_charges_are_listed_and_settled(tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.reserve("k", "crashed-a", 2.0, 1e-5)
    ledger.reserve("k", "crashed-b", 3.0, 1e-5)
    assert [(c.charge_id, c.epsilon) for c in ledger.pending("k")] == [("crashed-a", 2.0), ("crashed-b", 3.0)]
    ledger.settle("crashed-a", sent=True)  # the app learned it reached the server: final
    ledger.settle("crashed-b", sent=False)  # the app knows it never left: dropped
    assert ledger.pending("k") == [] and ledger.spent("k").epsilon == 2.0
    with pytest.raises(LedgerError, match="no pending charge"):
        ledger.settle("crashed-a", sent=False)


@pytest.mark.parametrize(("damage", "diagnosis"), [("delete", "vanished"), ("truncate", "vanished"),
                                                   ("corrupt", "corrupt"), ("replace", "replaced")])
def test_a_damaged_ledger_with_limits_fails_closed(tmp_path: Path, damage: str, diagnosis: str) -> None:
    path = tmp_path / "ledger.db"
    ledger = BudgetLedger(path)
    ledger.set_limits("k", total_epsilon=100.0)
    ledger.reserve("k", "a", 50.0, 1e-5)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(b"")
    elif damage == "corrupt":
        path.write_bytes(b"not a database" * 512)
    else:
        path.unlink()
        BudgetLedger(tmp_path / "other.db").reserve("k", "x", 1.0, 1e-5)
        (tmp_path / "other.db").rename(path)
    with pytest.raises(LedgerError):
        ledger.reserve("k", "b", 60.0, 1e-5)  # the open ledger object refuses
    with pytest.raises(LedgerError, match=diagnosis):
        BudgetLedger(path)  # and so does a fresh one, saying what happened
    BudgetLedger.discard(path)  # the app says so: start over
    assert BudgetLedger(path).spent("k").charges == 0


def _spend(path: str, worker: int, attempts: int, queue: "multiprocessing.Queue[int]", barrier) -> None:
    ledger = BudgetLedger(path)
    barrier.wait(timeout=60)  # both processes start charging at the same moment
    accepted = 0
    for i in range(attempts):
        try:
            ledger.reserve("shared", f"{worker}-{i}", 1.0, 1e-6)
            accepted += 1
        except BudgetExceededError:
            pass
    queue.put(accepted)


def test_two_processes_never_overspend(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    BudgetLedger(path).set_limits("shared", total_epsilon=50.0)
    ctx = multiprocessing.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    workers = [ctx.Process(target=_spend, args=(path, w, 40, queue, barrier)) for w in range(2)]
    for w in workers:
        w.start()
    accepted = [queue.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert sum(accepted) == 50 and min(accepted) > 0
    assert BudgetLedger(path).spent("shared").charges == 50


def test_a_crash_mid_send_keeps_the_charge_counted_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ready = tmp_path / "ready"
    sender = textwrap.dedent(f"""
        import time, pathlib
        from client_sdk.budget import BudgetLedger, Limits, Mechanism
        BudgetLedger({str(path)!r}).reserve("k", "in-flight", 4.0, 1e-5)
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(60)  # 'sending'
    """)
    proc = subprocess.Popen([sys.executable, "-c", sender], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)

    ledger = BudgetLedger(path)
    assert [c.charge_id for c in ledger.pending("k")] == ["in-flight"] and ledger.spent("k").epsilon == 4.0
    ledger.reserve("k", "in-flight", 4.0, 1e-5)  # the retry of the same bytes after restart
    assert ledger.spent("k").epsilon == 4.0


def test_remaining_is_the_cap_less_the_composed_spending_and_never_negative(tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.set_limits("alice", total_epsilon=10.0)
    assert ledger.remaining("alice") == 10.0 and ledger.remaining("bob") is None  # bob: no cap
    ledger.reserve("alice", "a", 4.0, 1e-5)
    ledger.reserve("bob", "b", 3.0, 1e-5)
    assert ledger.remaining("alice") == pytest.approx(6.0) and ledger.remaining("bob") is None
    ledger.set_limits("alice", total_epsilon=3.0)  # lowered below what was spent
    assert ledger.remaining("alice") == 0.0


def test_discard_removes_the_ledger_with_its_journal_and_limits(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    BudgetLedger(path).set_limits("k", total_epsilon=1.0)
    files = [path.with_name(path.name + suffix) for suffix in ("", "-wal", "-shm", ".limits.json")]
    for file in files:
        file.touch()  # SQLite leaves -wal and -shm behind a crash
    BudgetLedger.discard(path)
    assert [file.name for file in tmp_path.iterdir()] == ["ledger.db.lock"]  # the lock file holds no data


def _old_ledger(path: Path, *, limits: bool) -> None:
    """A ledger as the first versions wrote it: no id, limits inside the SQLite file, charges without a mechanism."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE charges (charge_id TEXT PRIMARY KEY, key TEXT NOT NULL, epsilon REAL NOT NULL,
                              delta REAL NOT NULL, state TEXT NOT NULL, created REAL NOT NULL);
        CREATE INDEX charges_by_key ON charges (key);
        INSERT INTO charges VALUES ('old', 'k', 2.0, 1e-6, 'sent', 0);
    """)
    if limits:
        db.executescript("""
            CREATE TABLE limits (key TEXT PRIMARY KEY, per_prompt_epsilon REAL, total_epsilon REAL);
            INSERT INTO limits VALUES ('k', 1.5, 40.0);
        """)
    db.commit()
    db.close()


def test_an_old_ledger_keeps_its_charges_and_limits(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    _old_ledger(path, limits=True)
    ledger = BudgetLedger(path)
    assert ledger.limits("k") == Limits(per_prompt_epsilon=1.5, total_epsilon=40.0)
    spent = ledger.spent("k")  # the old charge adds its epsilon and delta
    assert (spent.epsilon, spent.delta, spent.charges) == (2.0, 1e-6, 1)
    ledger.reserve("k", "new", 1.0, 1e-5, Mechanism(tokens=1, trials_per_token=10, p=0.6))
    assert BudgetLedger(path).spent("k").charges == 2  # and it opens again, migrated
    with pytest.raises(BudgetExceededError, match="per-prompt"):
        ledger.reserve("k", "big", 2.0, 1e-5)


def test_an_old_ledger_with_charges_but_neither_id_nor_limits_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    _old_ledger(path, limits=False)
    with pytest.raises(LedgerError, match="no id"):
        BudgetLedger(path)
    db = sqlite3.connect(path)
    assert [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["charges"]
    db.close()  # the failed open changed nothing (no meta table, no new columns)
    assert not path.with_name(path.name + ".limits.json").exists()


def test_a_sqlite_file_of_another_kind_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE charges (amount REAL)")
    db.close()
    with pytest.raises(LedgerError):
        BudgetLedger(path)


@pytest.mark.parametrize("content", ["[]", '"text"', '{"ledger_id": 1, "keys": {}}', '{"ledger_id": "a", "keys": []}',
                                     '{"ledger_id": "a", "keys": {}, "generation": "1"}', "{"])
def test_a_malformed_limits_file_fails_closed(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ledger.db"
    BudgetLedger(path)
    path.with_name(path.name + ".limits.json").write_text(content)
    with pytest.raises(LedgerError, match="unreadable"):
        BudgetLedger(path)


def _generations(path: Path) -> tuple[int, int]:
    """The generation in the SQLite file and in the limits file."""
    db = sqlite3.connect(path)
    (generation,) = db.execute("SELECT generation FROM meta").fetchone()
    db.close()
    return generation, json.loads(path.with_name(path.name + ".limits.json").read_text())["generation"]


def _without_journal(path: Path) -> None:
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def test_each_change_advances_the_generation_in_both_files_and_nothing_else_does(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = BudgetLedger(path)
    assert _generations(path) == (0, 0)
    ledger.reserve("k", "a", 1.0, 1e-5)
    assert _generations(path) == (1, 1)
    ledger.reserve("k", "a", 1.0, 1e-5)  # a retry
    ledger.set_limits("k", total_epsilon=5.0)
    ledger.spent("k"), ledger.pending("k"), ledger.release("a-sent-elsewhere")
    assert _generations(path) == (1, 1)
    ledger.mark_sent("a")
    assert _generations(path) == (2, 2)


def test_an_older_copy_of_the_ledger_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = BudgetLedger(path)
    ledger.reserve("k", "a", 4.0, 1e-5)
    backup = path.read_bytes()
    ledger.reserve("k", "b", 4.0, 1e-5)
    _without_journal(path)
    path.write_bytes(backup)  # charge b is missing from it
    with pytest.raises(LedgerError, match="older copy of the ledger"):
        ledger.spent("k")
    with pytest.raises(LedgerError, match="older copy of the ledger"):
        BudgetLedger(path)


def test_a_limits_file_one_change_behind_is_repaired_and_two_behind_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    limits_file = path.with_name(path.name + ".limits.json")
    ledger = BudgetLedger(path)
    two_behind = limits_file.read_text()
    ledger.reserve("k", "a", 1.0, 1e-5)
    one_behind = limits_file.read_text()  # as a crash between the two writes leaves it
    ledger.reserve("k", "b", 1.0, 1e-5)
    limits_file.write_text(one_behind)
    assert BudgetLedger(path).spent("k").charges == 2 and _generations(path) == (2, 2)
    limits_file.write_text(one_behind)
    assert ledger.spent("k").charges == 2 and _generations(path) == (2, 2)
    limits_file.write_text(two_behind)
    with pytest.raises(LedgerError, match="older copy of the limits file"):
        BudgetLedger(path)
    with pytest.raises(LedgerError, match="older copy of the limits file"):
        ledger.spent("k")


@pytest.mark.parametrize(("damage", "diagnosis"), [("delete", "missing"), ("replace", "replaced")])
def test_a_limits_file_that_vanished_or_was_replaced_fails_closed(tmp_path: Path, damage: str,
                                                                   diagnosis: str) -> None:
    path = tmp_path / "ledger.db"
    ledger = BudgetLedger(path)
    limits_file = path.with_name(path.name + ".limits.json")
    if damage == "delete":
        limits_file.unlink()
    else:
        BudgetLedger(tmp_path / "other.db")
        (tmp_path / "other.db.limits.json").replace(limits_file)
    for use in (lambda: ledger.spent("k"), lambda: ledger.limits("k"), lambda: ledger.set_limits("k")):
        with pytest.raises(LedgerError, match="vanished or was replaced"):
            use()
    with pytest.raises(LedgerError, match=diagnosis):
        BudgetLedger(path)


def test_a_ledger_from_before_the_generation_counter_opens(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    BudgetLedger(path).set_limits("k", total_epsilon=5.0)
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE meta DROP COLUMN generation")
    db.close()
    limits_file = path.with_name(path.name + ".limits.json")
    config = json.loads(limits_file.read_text())
    del config["generation"]
    limits_file.write_text(json.dumps(config))
    ledger = BudgetLedger(path)
    assert ledger.limits("k").total_epsilon == 5.0 and ledger.spent("k").charges == 0
    BudgetLedger(path).reserve("k", "a", 1.0, 1e-5)  # migrated once: it opens again
    assert _generations(path) == (1, 1)


def test_an_empty_file_without_limits_starts_a_new_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    path.touch()
    ledger = BudgetLedger(path)
    ledger.reserve("k", "a", 1.0, 1e-5)
    assert BudgetLedger(path).spent("k").charges == 1


def test_a_ledger_folder_is_created_and_a_held_lock_or_busy_file_fails_without_waiting_forever(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ledger.db"
    ledger = BudgetLedger(path, timeout=0.1)
    with FileLock(str(path.with_name("ledger.db.lock"))):
        with pytest.raises(LedgerError, match="lock"):
            ledger.spent("k")
    busy = sqlite3.connect(path, isolation_level=None)
    busy.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):  # busy, not reported as corrupt
        ledger.reserve("k", "a", 1.0, 1e-5)
    busy.execute("ROLLBACK")
    busy.close()
    assert ledger.spent("k").charges == 0


def test_a_ledger_whose_folder_or_lock_cannot_be_made_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    with pytest.raises(LedgerError, match="folder"):
        BudgetLedger(tmp_path / "file" / "ledger.db")
    (tmp_path / "ledger.db.lock").mkdir()
    with pytest.raises(LedgerError, match="lock"):
        BudgetLedger(tmp_path / "ledger.db")


def test_charges_with_a_mechanism_compose_with_those_without_up_to_the_cap(tmp_path: Path) -> None:
    p, trials = 0.6, 100
    ledger = BudgetLedger(tmp_path / "ledger.db")
    three_tokens, one_trial_more = (composition.composed_epsilon(((p, n),), DEFAULT_DELTA) for n in (300, 301))
    ledger.set_limits("k", total_epsilon=1.0 + (three_tokens + one_trial_more) / 2)  # 1.0, then exactly 3 tokens
    ledger.reserve("k", "no-mechanism", 1.0, 1e-5)
    with pytest.raises(BudgetExceededError):
        ledger.reserve("k", "four", 0.1, 1e-5, Mechanism(tokens=4, trials_per_token=trials, p=p))
    ledger.reserve("k", "three", 0.1, 1e-5, Mechanism(tokens=3, trials_per_token=trials, p=p))
    for over in (lambda: ledger.reserve("k", "half", 0.5, 1e-5),
                 lambda: ledger.reserve("k", "one-trial", 0.0, 1e-5, Mechanism(tokens=1, trials_per_token=1, p=p))):
        with pytest.raises(BudgetExceededError, match=f"has spent {1.0 + three_tokens:.4g} of"):
            over()
    spent = ledger.spent("k")
    assert spent.epsilon == pytest.approx(1.0 + three_tokens) and spent.delta == pytest.approx(DEFAULT_DELTA + 1e-5)
    assert (spent.charges, spent.private_tokens) == (2, 3)


def test_limits_are_non_negative_and_a_zero_cap_allows_nothing(tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path / "ledger.db")
    for limit in ("per_prompt_epsilon", "total_epsilon"):
        with pytest.raises(ValueError, match=limit):
            ledger.set_limits("k", **{limit: -1.0})
    ledger.set_limits("k", per_prompt_epsilon=0.0, total_epsilon=0.0)
    assert ledger.limits("k") == Limits(per_prompt_epsilon=0.0, total_epsilon=0.0)
    with pytest.raises(BudgetExceededError):
        ledger.reserve("k", "a", 0.5, 1e-5)


def test_a_limits_file_that_cannot_be_written_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = BudgetLedger(tmp_path / "ledger.db")

    def failing_fsync(directory: Path) -> None:
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(budget, "fsync_directory", failing_fsync)
    with pytest.raises(LedgerError, match="cannot write"):
        ledger.set_limits("k", total_epsilon=1.0)


def test_spending_is_composed_at_the_keys_delta(tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.set_limits("k", delta=1e-7)
    ledger.reserve("k", "a", 1.0, 1e-5, Mechanism(tokens=2, trials_per_token=100, p=0.6))
    spent = ledger.spent("k")
    assert spent.delta == 1e-7 and spent.epsilon == composition.composed_epsilon(((0.6, 200),), 1e-7)
