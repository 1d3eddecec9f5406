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
    for cmd in (["config", "show"], ["config", "validate"], ["data", "demo"], ["train"], ["tune"], ["prior"],
                ["summary"]):
        assert runner.invoke(app, [*cmd, "--help"]).exit_code == 0, cmd
