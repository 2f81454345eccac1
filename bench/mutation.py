"""Mutation testing of the privacy-critical modules with mutmut 3, one module at a time.

    veil bench mutation [--module client_sdk/budget.py ...] [--label after] [--tests-ref REF] [--max-minutes 20]
                        [--max-children 1] [--rescore]

For each module: a scratch copy of client_sdk/, app/ and tests/ (the tests as of git REF with --tests-ref, to score the
suite before new tests), whose pyproject's [tool.mutmut] mutates only that module and selects the tests that exercise
it; then `nice -n 19 mutmut run`. mutmut first records which tests reach each function and then runs
each mutant only against those. A module still running after --max-minutes is stopped: its unchecked mutants are
reported as "not run". app/service.py is scored on its request side only (REQUEST_SIDE).

Each surviving mutant is listed with its diff and a reason: the one written for it in bench/mutation_equivalent.json
(why it is equivalent or harmless; applied only while the mutant's added line is still the one recorded), two kinds classified automatically ("message wording": only the text of an
error or log message; "SQL case": only the letter case of an SQL statement), or "UNEXPLAINED". Score = (killed + timeouts) / checked mutants; "explained" adds the
survivors with a reason. Writes bench/results/mutation.json (results of every label) and bench/results/mutation.md.
Not part of CI: a full run takes tens of minutes on two cores.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "mutation.json"
TABLE = RESULTS.with_suffix(".md")
EQUIVALENT = REPO / "bench" / "mutation_equivalent.json"

CLIENT_TESTS = ["tests/test_client.py"]
LEDGER_TESTS = ["tests/test_budget.py", *(f"tests/test_client.py::{name}" for name in (
    "test_the_template_is_public_the_message_private_and_only_private_tokens_are_charged",
    "test_the_default_ledger_exists_after_the_first_call_and_survives_a_restart",
    "test_over_budget_is_refused_before_any_byte_leaves", "test_a_prompt_over_the_per_prompt_cap_sends_nothing",
    "test_a_failed_send_releases_the_charge_only_when_nothing_can_have_left"))]
MODULES: dict[str, list[str]] = {
    "client_sdk/client.py": CLIENT_TESTS,
    "client_sdk/budget.py": LEDGER_TESTS,
    "client_sdk/policy.py": ["tests/test_policy.py", *CLIENT_TESTS],
    "client_sdk/mechanism.py": ["tests/test_mechanism.py", "tests/test_accounting.py", "tests/test_policy.py"],
    "client_sdk/wire.py": ["tests/test_wire.py", *CLIENT_TESTS],
    "client_sdk/spans.py": ["tests/test_spans.py", *CLIENT_TESTS],
    "client_sdk/privatize.py": ["tests/test_privatize.py", "tests/test_wire.py", "tests/test_spans.py", *CLIENT_TESTS],
    "client_sdk/bundle.py": ["tests/test_bundle.py", *CLIENT_TESTS],
    "client_sdk/accounting/*.py": ["tests/test_accounting.py"],
    "app/access.py": ["tests/test_keys.py", *(f"tests/test_hardening.py::{name}" for name in (
        "test_forwarded_headers_are_believed_only_from_trusted_proxies",
        "test_failed_authentication_is_throttled_per_address_and_not_audited_past_the_limit",
        "test_rate_limits_use_the_configured_storage", "test_a_tenants_dp_prompt_is_served_only_to_that_tenants_keys"))],
    "app/routes/generate.py": ["tests/test_server.py", "tests/test_server_spans.py", "tests/test_keys.py",
                               "tests/test_availability.py"],
    "app/service.py": ["tests/test_server.py", "tests/test_server_spans.py",
                       "tests/test_hardening.py::test_a_tenants_dp_prompt_is_served_only_to_that_tenants_keys"],
}
REQUEST_SIDE = {"app/service.py": [f"app.service.xǁInferenceServiceǁ{name}__mutmut_*" for name in
                                   ("max_payload_bytes", "prepare", "submit", "generate", "stream", "_response")]}
CAUGHT = {"killed", "timeout", "caught by type check", "segfault"}
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 35: "suspicious",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "caught by type check",
          -11: "segfault", -9: "segfault", None: "not run"}
MESSAGE_CALL = re.compile(r"\b(raise|\w*Error\(|\w*Exception\(|warn\(|echo\(|print\(|\.(info|warning|error)\()")


def scratch_copy(root: Path, module: str, tests: list[str], tests_ref: str | None) -> None:
    """client_sdk/, app/ and tests/ in `root`, with a pyproject whose [tool.mutmut] covers `module` only."""
    for name in ("client_sdk", "app"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    if tests_ref:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", tests_ref, "tests"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    else:
        shutil.copytree(REPO / "tests", root / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    tests = [t for t in tests if (root / t.split("::")[0]).exists()]
    project = (REPO / "pyproject.toml").read_text().split("[tool.mutmut]")[0]
    (root / "pyproject.toml").write_text(
        project + "[tool.mutmut]\n"
        f"source_paths = {json.dumps(['client_sdk', 'app'])}\n"
        f"only_mutate = {json.dumps([module])}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        f"pytest_add_cli_args = {json.dumps(['-p', 'no:cacheprovider', '-W', 'ignore'])}\n"
        'process_isolation = "forkserver"\n')


def run_module(module: str, tests_ref: str | None, max_minutes: float, children: int) -> dict:
    """Run mutmut on one module in a scratch directory; its mutants' statuses and survivors' diffs."""
    root = Path(tempfile.mkdtemp(prefix="veil-mutation-"))
    try:
        scratch_copy(root, module, MODULES[module], tests_ref)
        patterns = REQUEST_SIDE.get(module, [])
        start = time.monotonic()
        with open(root / "mutmut.log", "w") as log:
            proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "mutmut", "run", "--max-children", str(children),
                                     *patterns], cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=max_minutes * 60)
                stopped = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
                stopped = True
        minutes = (time.monotonic() - start) / 60
        statuses: dict[str, str] = {}
        for meta in (root / "mutants").rglob("*.py.meta"):
            for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
                if not patterns or any(fnmatch.fnmatch(name, p) for p in patterns):
                    statuses[name] = STATUS.get(code, "suspicious")
        if not statuses:
            tail = (root / "mutmut.log").read_text()[-2000:]
            raise RuntimeError(f"mutmut produced no mutants for {module}:\n{tail}")
        diffs = {name: show(root, name) for name, status in statuses.items() if status in ("survived", "no tests")}
        return {"statuses": statuses, "diffs": diffs, "minutes": round(minutes, 1), "stopped_early": stopped}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def show(root: Path, name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=root, capture_output=True, text=True,
                         check=False)
    return "\n".join(line for line in out.stdout.splitlines() if not line.startswith("#")).strip()


def _tokens(line: str) -> list[tuple[int, str]]:
    try:
        return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline)
                if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return []


def _is_key(tokens: list[tuple[int, str]], i: int) -> bool:
    """The string at `i` is a subscript or a .get() key, not text."""
    return (i >= 1 and tokens[i - 1][1] == "[") or (i >= 2 and [t[1] for t in tokens[i - 2:i]] == ["get", "("])


def is_message_wording(diff: str) -> bool:
    """The mutant changes only string literals, inside a statement that raises, warns, logs or prints."""
    lines = diff.splitlines()
    removed = [i for i, line in enumerate(lines) if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in lines if line.startswith("+") and not line.startswith("+++")]
    if len(removed) != 1 or len(added) != 1:
        return False
    before, after = _tokens(lines[removed[0]][1:]), _tokens(added[0])
    strings = (tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING))
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    if not before or len(before) != len(after) or any(before[i][0] != after[i][0] or before[i][0] not in strings
                                                       or _is_key(before, i) for i in changed):
        return False
    for line in reversed(lines[:removed[0] + 1]):  # the statement's first line, within the diff's context
        text = line[1:]
        if MESSAGE_CALL.search(text):
            return True
        if not text.startswith(" " * (len(text) - len(text.lstrip()))) or text.rstrip().endswith(":"):
            break
    return False


SQL = re.compile(r"""^[-+]\s*.*?(["'])\s*(SELECT|UPDATE|DELETE|INSERT)\b""", re.IGNORECASE)


def is_sql_case(diff: str) -> bool:
    """The mutant changes only the letter case of an SQL statement, none of its quoted values."""
    changed = [line[1:] for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("---", "+++")]
    return (len(changed) == 2 and changed[0] != changed[1] and changed[0].lower() == changed[1].lower()
            and all(SQL.match("-" + line) for line in changed)
            and re.findall(r"'[^']*'", changed[0]) == re.findall(r"'[^']*'", changed[1]))


def _changed_lines(diff: str, sign: str) -> list[str]:
    return [line[1:].strip() for line in diff.splitlines() if line.startswith(sign) and not line.startswith(sign * 3)]


def reason_for(name: str, diff: str, equivalent: dict[str, str]) -> str:
    """The survivor's reason. A recorded one applies while its "change" is still among the mutant's added lines, or
    among its removed lines for a mutant that only deletes (an argument, say)."""
    known = equivalent.get(name)
    changed = _changed_lines(diff, "+") or _changed_lines(diff, "-")
    if known and known["change"] in changed:  # the same mutant still (names are renumbered when the code changes)
        return known["reason"]
    if is_sql_case(diff):
        return "equivalent (auto): SQL keywords and identifiers are case-insensitive; the quoted values are unchanged"
    if is_message_wording(diff):
        return "message wording (auto): changes only the text of an error or log message"
    return "UNEXPLAINED"


def summarize(run: dict, equivalent: dict[str, str]) -> dict:
    counts = Counter(run["statuses"].values())
    checked = sum(n for status, n in counts.items() if status not in ("not run", "skipped"))
    caught = sum(counts[s] for s in CAUGHT)
    survivors = [{"mutant": name, "status": status, "reason": reason_for(name, run["diffs"][name], equivalent),
                  "diff": run["diffs"][name]}
                 for name, status in sorted(run["statuses"].items()) if status in ("survived", "no tests")]
    return rescored({"mutants": len(run["statuses"]), "checked": checked, "counts": dict(counts), "killed": caught,
                     "score": round(caught / checked, 4) if checked else None, "minutes": run["minutes"],
                     "stopped_early": run["stopped_early"], "survivors": survivors})


def rescored(r: dict) -> dict:
    """`r` with the scores that depend on its survivors' reasons: counting the explained ones as caught, and leaving
    the equivalent ones out of the mutants (the usual mutation score: an equivalent mutant is no bug to catch)."""
    explained = sum(s["reason"] != "UNEXPLAINED" for s in r["survivors"])
    equivalent = sum(s["reason"].startswith("equivalent") for s in r["survivors"])
    r["unexplained"] = len(r["survivors"]) - explained
    r["equivalent"] = equivalent
    r["score_with_explained"] = round((r["killed"] + explained) / r["checked"], 4) if r["checked"] else None
    r["score_without_equivalent"] = round(r["killed"] / (r["checked"] - equivalent), 4) if r["checked"] else None
    return r


def write_table(results: dict) -> None:
    lines = ["# Mutation score of the privacy-critical modules (mutmut 3)", "",
             ("Reproduce: `python -m app.cli bench mutation` (after), "
              "`python -m app.cli bench mutation --label before --tests-ref 7f3407a` (before, the tests before issue 26)."),
             ("Score = (killed + timeouts) / checked; without equivalent = killed / (checked - equivalent survivors), "
              "the usual mutation score; explained = also counting survivors with a stated reason (equivalent or "
              "harmless)."), "",
             ("| module | label | mutants | checked | killed | survived | no tests | not run | score | "
              "without equivalent | explained | unexplained | minutes |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, modules in sorted(results.items(), key=lambda kv: kv[0] != "before"):
        total = Counter()
        for module, r in modules.items():
            c = r["counts"]
            lines.append(f"| {module} | {label} | {r['mutants']} | {r['checked']} | {r['killed']} | "
                         f"{c.get('survived', 0)} | {c.get('no tests', 0)} | {c.get('not run', 0)} | "
                         f"{r['score']:.1%} | {r['score_without_equivalent']:.1%} | {r['score_with_explained']:.1%} | "
                         f"{r['unexplained']} | {r['minutes']}{' (stopped)' if r['stopped_early'] else ''} |")
            total.update({k: r[k] for k in ("mutants", "checked", "killed", "unexplained", "equivalent")})
            total["explained"] += sum(s["reason"] != "UNEXPLAINED" for s in r["survivors"])
        if total["checked"]:
            lines.append(f"| **all** | {label} | {total['mutants']} | {total['checked']} | {total['killed']} | | | | "
                         f"{total['killed'] / total['checked']:.1%} | "
                         f"{total['killed'] / (total['checked'] - total['equivalent']):.1%} | "
                         f"{(total['killed'] + total['explained']) / total['checked']:.1%} | {total['unexplained']} | |")
    after = results.get("after", {})
    lines += ["", "## Surviving mutants (after)", ""]
    for module, r in after.items():
        for s in r["survivors"]:
            lines += [f"### `{s['mutant']}` ({s['status']})", "", f"Reason: {s['reason']}", "", "```diff", s["diff"],
                      "```", ""]
    TABLE.write_text("\n".join(lines) + "\n")


def module_name(value: str) -> str:
    """A --module value as a key of MODULES: the key itself, or a file its pattern covers (from an unquoted glob)."""
    for name in MODULES:
        if fnmatch.fnmatch(value, name):
            return name
    raise argparse.ArgumentTypeError(f"{value!r} is not one of the modules mutated: {', '.join(MODULES)}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="veil bench mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="extend", nargs="+", type=module_name,
                        help=f"one of {', '.join(MODULES)} (default: every one)")
    parser.add_argument("--label", default="after", help="the results' label (e.g. before, after)")
    parser.add_argument("--tests-ref", help="git ref whose tests/ to run (default: the working tree's)")
    parser.add_argument("--max-minutes", type=float, default=20.0, help="stop a module after this long")
    parser.add_argument("--max-children", type=int, default=1, help="mutants run at once")
    parser.add_argument("--rescore", action="store_true",
                        help="run nothing: reclassify the stored survivors (after editing the reasons) and rewrite")
    args = parser.parse_args()
    equivalent = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.rescore:
        for modules in results.values():
            for module, r in modules.items():
                for s in r["survivors"]:
                    s["reason"] = reason_for(s["mutant"], s["diff"], equivalent)
        save(results)
        return
    for module in dict.fromkeys(args.module or MODULES):  # an unquoted glob expands to several files of one module
        print(f"{module}: mutating ({args.label})", flush=True)
        summary = summarize(run_module(module, args.tests_ref, args.max_minutes, args.max_children), equivalent)
        results.setdefault(args.label, {})[module] = summary
        print(f"  {summary['killed']}/{summary['checked']} killed ({summary['score']:.1%}), "
              f"{summary['unexplained']} unexplained survivors, {summary['minutes']} min"
              f"{', stopped early' if summary['stopped_early'] else ''}", flush=True)
        save(results)


def save(results: dict) -> None:
    """Write the results (every module's scores recomputed from its survivors' reasons) and the table."""
    for modules in results.values():
        for r in modules.values():
            rescored(r)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, RESULTS)
    write_table(results)
    print(f"wrote {RESULTS.relative_to(REPO)} and {TABLE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
