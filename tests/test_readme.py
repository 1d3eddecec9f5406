"""The README's Python examples run as written, and the commands it names exist."""

from __future__ import annotations

import re

from conftest import ROOT
from typer.testing import CliRunner

from sqgan.cli import app


def test_readme_python_examples_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_commands_exist_in_cli_and_makefile():
    text = (ROOT / "README.md").read_text()
    make = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "ui", "setup"):
        assert f"make {target}" in text, target
        assert re.search(rf"^{target}:", make, flags=re.M), target
    runner = CliRunner()
    block = text.split("## Commands", 1)[1].split("```")[1]
    listed = set()
    for line in block.splitlines():
        if not line.startswith("sqgan "):
            continue
        words = []
        for w in re.split(r"\s{2,}", line)[0].split()[1:]:  # the description starts after a wide gap
            if not re.fullmatch(r"[a-z0-9|]+", w):
                break
            words.append(w)
        for last in words[-1].split("|"):  # config show|validate
            listed.add((*words[:-1], last))
    assert {("train",), ("tune",), ("eval",), ("reproduce",), ("summary",), ("config", "show")} <= listed
    for cmd in sorted(listed):
        assert runner.invoke(app, [*cmd, "--help"]).exit_code == 0, cmd
