"""The client SDK runs on a device without torch."""

import ast
import subprocess
import sys
from pathlib import Path

BLOCK_AND_USE = """
import sys

class Blocker:  # a device without torch: importing it (or the server's stack) fails
    BLOCKED = ("torch", "transformers", "fastapi", "app")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Blocker())
import numpy as np
import client_sdk
from client_sdk.mechanism import MechanismParams
from client_sdk.privatize import privatize_tokens
params = MechanismParams.from_mu(5.0, bits=4, dim=8, clip=0.05)
data = privatize_tokens(np.array([0, 1]), np.zeros((4, 8), np.float32), params, "00" * 8)
report = client_sdk.privacy_report(params, tokens=2)
assert len(data) == client_sdk.wire.payload_size(2, 8, 4) and report.epsilon > 0
from client_sdk.detect import detect  # the detector too: numpy and its shipped weights, no NER library
assert [d.label for d in detect("Mail ann@example.com")] == ["EMAIL"]
assert not any(m.split(".")[0] in Blocker.BLOCKED for m in sys.modules)
print("ok")
"""


def test_client_sdk_imports_and_works_without_torch() -> None:
    out = subprocess.run([sys.executable, "-c", BLOCK_AND_USE], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_client_sdk_never_imports_the_server() -> None:
    sdk = Path(__file__).parents[1] / "client_sdk"
    offenders = []
    for path in sdk.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("app", "bench")]
    assert not offenders


def test_veil_privacy_runs_without_torch() -> None:
    code = BLOCK_AND_USE.split("import numpy")[0].replace('"fastapi", "app"', '"fastapi"') + (
        "from app.cli import cli\n"
        "from typer.testing import CliRunner\n"
        "result = CliRunner().invoke(cli, ['privacy', '--mu', '1', '--json'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
