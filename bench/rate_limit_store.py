"""Capacity of the replicas' shared rate-limit store: one Redis, running the Lua scripts `limits` runs per check.

    veil bench rate-limit-store [--requests 200000] [--connections 50] [--callers 10000]

Starts a private redis-server (as `veil serve --replicas` does), loads the fixed-window (`incr_expire.lua`) and
moving-window (`acquire_moving_window.lua`) scripts from the installed `limits`, and drives each with
`redis-benchmark` (EVALSHA, `--callers` random keys, `--connections` parallel clients). Prints checks per second
and writes bench/results/rate-limit-store.json. docs/DEPLOY.md uses the figure in its scaling calculation.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import time
from importlib.resources import files
from pathlib import Path

import redis

from app.ray_serve import redis_server

RESULTS = Path(__file__).parent / "results" / "rate-limit-store.json"
SCRIPTS = {  # strategy: (script, its ARGV after the key)
    "fixed window": ("incr_expire.lua", ["60", "1"]),
    "moving window": ("acquire_moving_window.lua", [str(time.time()), "600", "60", "1"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--callers", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    benchmark = shutil.which("redis-benchmark")
    if benchmark is None:
        raise SystemExit("redis-benchmark not found: apt-get install redis-server")
    rows = []
    with redis_server() as uri:
        port = uri.rsplit(":", 1)[1]
        for strategy, (script, argv) in SCRIPTS.items():
            source = files("limits").joinpath("resources/redis/lua_scripts", script).read_text()
            sha = redis.Redis.from_url(uri).script_load(source)
            command = [benchmark, "-p", port, "-n", str(args.requests), "-c", str(args.connections),
                       "-r", str(args.callers), "--csv", "EVALSHA", sha, "1", f"{script}:__rand_int__", *argv]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = next(csv.DictReader(io.StringIO(output)))
            rows.append({"strategy": strategy, "script": script, "checks_per_second": float(result["rps"]),
                         "p50_ms": float(result["p50_latency_ms"]), "p99_ms": float(result["p99_latency_ms"])})
    print(f"\n{args.requests} checks, {args.connections} connections, {args.callers} callers\n")
    print("| strategy | checks/s | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['strategy']} | {row['checks_per_second']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
