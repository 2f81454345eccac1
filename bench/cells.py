"""Resumable benchmark runs: named cells computed one by one, each saved the moment it is done."""

from __future__ import annotations

import json
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from app.files import write_json_atomic

Cell = tuple[str, Callable[[], dict]]


def run_cells(path: Path, plan: dict, cells: list[Cell], *, fresh: bool = False, desc: str = "cells",
              metadata: dict | None = None, defer: tuple[str, ...] = (), redo: tuple[str, ...] = ()) -> dict:
    """Compute every cell not yet saved in `path` under the same `plan`, saving after each; returns the results.

    A saved run of a different plan is refused (SystemExit) unless `fresh`, so results are never mixed. `metadata`
    (what describes the run rather than one cell) is saved with the first cell, so a partial run is readable.
    Cells whose key matches a `defer` pattern (fnmatch) are left for a later run; saved ones matching a `redo`
    pattern are dropped as stale and computed again (now, or by a later run if also deferred).
    """
    plan = json.loads(json.dumps(plan))  # tuples -> lists, as they come back from the file
    results = {"plan": plan, "cells": {}, "seconds": 0.0}
    if path.exists() and not fresh:
        saved = json.loads(path.read_text())
        if saved.get("plan") != plan:
            raise SystemExit(f"{path} holds a run with a different plan; pass --fresh to start over")
        results = saved
    results.update(metadata or {})
    matches = lambda key, patterns: any(fnmatch(key, p) for p in patterns)  # noqa: E731
    stale = [key for key, _ in cells if key in results["cells"] and matches(key, redo)]
    for key in stale:  # dropped now, even if deferred, so that no later run or render reads them
        results["seconds"] -= results["cells"].pop(key).get("seconds", 0.0)
    if stale:
        write_json_atomic(path, results)
    todo = [(key, compute) for key, compute in cells if key not in results["cells"] and not matches(key, defer)]
    if len(todo) < len(cells):
        print(f"resuming {path}: {len(todo)} of {len(cells)} cells left")
    for key, compute in (progress := tqdm(todo, desc=desc, unit="cell")):
        progress.set_postfix_str(key)
        started = time.perf_counter()
        results["cells"][key] = {**compute(), "seconds": time.perf_counter() - started}
        results["seconds"] += results["cells"][key]["seconds"]
        write_json_atomic(path, results)
    return results
