"""The device's budget ledger: limits, idempotent charges, two writers at once, a crash mid-send."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from client_sdk.budget import BudgetLedger
from client_sdk.errors import BudgetExceededError


def test_per_prompt_and_total_limits(tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path / "ledger.db")
    ledger.set_limits("alice", per_prompt_epsilon=10.0, total_epsilon=25.0)
    with pytest.raises(BudgetExceededError, match="per-prompt"):
        ledger.reserve("alice", "big", 11.0, 1e-5)
    ledger.reserve("alice", "a", 10.0, 1e-5)
    ledger.reserve("alice", "b", 10.0, 1e-5)
    with pytest.raises(BudgetExceededError, match="left"):
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


def _spend(path: str, worker: int, attempts: int, queue: "multiprocessing.Queue[int]") -> None:
    ledger = BudgetLedger(path)
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
    queue = ctx.Queue()
    workers = [ctx.Process(target=_spend, args=(path, w, 40, queue)) for w in range(2)]
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
        from client_sdk.budget import BudgetLedger
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
    assert ledger.pending("k") == ["in-flight"] and ledger.spent("k").epsilon == 4.0
    ledger.reserve("k", "in-flight", 4.0, 1e-5)  # the retry of the same bytes after restart
    assert ledger.spent("k").epsilon == 4.0
