"""Each DVC stage's `deps` cover every sqgan module its stage function imports (directly or not), and every
stage in dvc.yaml runs a stage of the one table.

Left out on purpose: the dispatch shells `cli.py` and `stages.py`, which only map params to arguments (DVC tracks
those params itself)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from sqgan.data.stages import STAGES

SRC = ROOT / "src"
DVC_TO_STAGE = {"demo_data": "demo"}  # DVC stage name → table name where they differ
ENTRY = {"train": ("sqgan.shells.ray_train",), "sweep": ("sqgan.shells.tune",),  # stages outside the data table
         "prior": ("sqgan.commands.prior",), "report": ("sqgan.commands.report",),
         "eval": ("sqgan.commands.eval",), "experiment": ("sqgan.commands.experiment",)}


def _module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.exists():
            return cand
    return None


def _imports(path: Path) -> set[str]:
    """sqgan modules `path` imports anywhere (also inside functions), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sqgan")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sqgan"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return out


def closure(modules: tuple[str, ...]) -> set[Path]:
    todo, seen = list(modules), set()
    while todo:
        f = _module_file(todo.pop())
        if f is None or f in seen or f.name in ("cli.py", "stages.py") and f.parent.name == "sqgan":
            continue
        seen.add(f)
        todo.extend(_imports(f))
    return seen


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("dvc_stage", list(_stages()))
def test_dvc_stage_deps_cover_every_module_the_stage_imports(dvc_stage):
    spec = _stages()[dvc_stage]
    if dvc_stage in ENTRY:
        entry = ENTRY[dvc_stage]
    else:
        stage = STAGES[DVC_TO_STAGE.get(dvc_stage, dvc_stage)]
        entry = (stage.function.split(":")[0], *stage.modules)
    deps = [ROOT / d for d in spec["deps"] if d.startswith("src/")]
    needed = closure(entry)
    assert needed, entry
    missing = sorted(str(f.relative_to(ROOT)) for f in needed if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"dvc.yaml stage {dvc_stage!r} lacks deps {missing}"


def test_every_data_stage_in_dvc_yaml_runs_the_table_stage_of_its_name():
    for name, spec in _stages().items():
        if name in ENTRY:
            continue
        stage = STAGES[DVC_TO_STAGE.get(name, name)]
        assert spec["cmd"].startswith(("sqgan data prepare " + name, "sqgan data " + stage.name)), name
        section = stage.section if name != "metfaces" else "data.metfaces"
        assert section in spec["params"] or stage.section in spec["params"], name


def test_closure_follows_imports_inside_functions():
    files = {f.name for f in closure(("sqgan.data.dogface",))}
    assert {"dogface.py", "recipe.py", "manifest.py", "images.py", "io.py"} <= files
