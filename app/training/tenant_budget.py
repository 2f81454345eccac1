"""Each tenant's training privacy budget: a ledger of the DP-SGD jobs run on their data.

Jobs on one tenant's data compose. The ledger uses basic composition (epsilons add, deltas add), which is loose but
holds for any mix of jobs, and charges a job's target epsilon when it is submitted, before it starts: a job that
would take the tenant past their limit is refused. A charge is not refunded if the job fails or is cancelled,
because the data has been touched. The file is rewritten atomically under a lock that also holds across processes
(the server's job manager and `veil train` may share a cache directory).
"""

from __future__ import annotations

import fcntl
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, Field

from app.files import write_json_atomic


class BudgetExceeded(Exception):
    """The job would take the tenant past their training epsilon (HTTP 409)."""


class Charge(BaseModel):
    job: str
    epsilon: float
    delta: float
    at: float = Field(default_factory=time.time)


class TenantBudget(BaseModel):
    tenant: str
    limit: float = Field(description="total training epsilon allowed on this tenant's data")
    charges: list[Charge] = []

    @property
    def spent(self) -> float:
        return sum(c.epsilon for c in self.charges)

    def report(self) -> dict:
        return {**self.model_dump(), "spent": self.spent, "remaining": self.limit - self.spent,
                "delta_spent": sum(c.delta for c in self.charges)}


class TenantBudgets:
    """The ledger at `path`; tenants without an explicit limit get `default_limit`."""

    def __init__(self, path: Path, default_limit: float) -> None:
        self.path, self.default_limit = path, default_limit
        self._lock = threading.Lock()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _load(self) -> dict[str, TenantBudget]:
        if not self.path.exists():
            return {}
        return {t: TenantBudget(**b) for t, b in json.loads(self.path.read_text()).items()}

    def _save(self, budgets: dict[str, TenantBudget]) -> None:
        write_json_atomic(self.path, {t: b.model_dump() for t, b in budgets.items()})

    def get(self, tenant: str) -> TenantBudget:
        with self._locked():
            return self._load().get(tenant, TenantBudget(tenant=tenant, limit=self.default_limit))

    def set_limit(self, tenant: str, limit: float) -> TenantBudget:
        with self._locked():
            budgets = self._load()
            budget = budgets.get(tenant, TenantBudget(tenant=tenant, limit=limit))
            budget.limit = limit
            budgets[tenant] = budget
            self._save(budgets)
            return budget

    def charge(self, tenant: str, job: str, epsilon: float, delta: float) -> TenantBudget:
        """Record a job's (epsilon, delta), or raise BudgetExceeded and record nothing."""
        with self._locked():
            budgets = self._load()
            budget = budgets.get(tenant, TenantBudget(tenant=tenant, limit=self.default_limit))
            if budget.spent + epsilon > budget.limit + 1e-12:
                raise BudgetExceeded(f"tenant {tenant!r} has {budget.limit - budget.spent:.4g} of {budget.limit:g} "
                                     f"training epsilon left; this job needs {epsilon:g}")
            budget.charges.append(Charge(job=job, epsilon=epsilon, delta=delta))
            budgets[tenant] = budget
            self._save(budgets)
            return budget
