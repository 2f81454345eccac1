"""README's usage example runs as written (against the tiny model on loopback instead of port 8000)."""

import re
from pathlib import Path


def test_the_readme_usage_example_runs(loopback, capsys) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Using it") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert "http://127.0.0.1:8000" in code
    exec(compile(code.replace("http://127.0.0.1:8000", loopback.url), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "epsilon left for alice:" in out
