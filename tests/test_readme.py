"""The README's example runs as written (on the generated tiny models, through llama.cpp)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    env = {"ZETA_CACHE_DIR": str(tmp_path / "models"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("coder-tiny 16 tokens")
    assert lines[1] == "2 vectors from embedder-tiny"
    assert {line.split()[0] for line in lines[-3:]} == {
        "coder-tiny",
        "embedder-tiny",
        "reasoner-tiny",
    }


def test_readme_names_the_two_commands() -> None:
    text = README.read_text()
    assert ".venv/bin/zeta demo" in text
    assert ".venv/bin/pytest" in text
