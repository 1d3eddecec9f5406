"""The house's layers (ARCHITECTURE.md), read from the imports of src/sqgan: every module sits in one layer, imports
only from its own layer or those below, takes part in no import circle, and keeps its imports at its top.

Imports are read anywhere in a module (also inside functions), except under `if TYPE_CHECKING:`. The checks are
functions of a source tree, so the last tests plant an upward import, a circle and a hidden import in a scratch copy
and see each one caught."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from conftest import ROOT

SRC = ROOT / "src"
LAYERS = [  # bottom to top: (name, module prefixes)
    ("foundations", ("sqgan", "sqgan.config", "sqgan.io", "sqgan.tags")),
    ("core", ("sqgan.quant", "sqgan.models", "sqgan.losses", "sqgan.metrics", "sqgan.data")),
    ("loop", ("sqgan.train", "sqgan.sampling")),
    ("shells", ("sqgan.shells",)),
    ("commands", ("sqgan.commands", "sqgan.cli")),
]
ORCHESTRATION = ("ray", "mlflow", "dvc", "kfp", "kubernetes")  # what only shells and commands may import
ON_DEMAND = ("open_clip", "transformers", "huggingface_hub", "kubernetes")  # optional heavy deps, loaded in a function


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names `module`'s package."""
    best, length = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > length:
                best, length = i, len(p)
    if best is None or (best == 0 and module not in LAYERS[0][1]):
        raise KeyError(module)
    return best


def modules(src: Path) -> dict[str, Path]:
    out = {}
    for f in sorted((src / "sqgan").rglob("*.py")):
        name = ".".join(f.relative_to(src).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, inside a function) for each import in `path`, outside `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    local = {id(n) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
             for n in ast.walk(fn)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in local) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.module, node.lineno, id(node) in local))
            # `from sqgan.shells import tracking` imports the module sqgan.shells.tracking
            out += [(f"{node.module}.{a.name}", node.lineno, id(node) in local) for a in node.names
                    if node.module.startswith("sqgan")]
    return out


def graph(src: Path) -> dict[str, set[str]]:
    mods = modules(src)
    return {m: {t for t, _, _ in imports(f) if t in mods and t != m} for m, f in mods.items()}


def upward_imports(src: Path) -> list[str]:
    bad = []
    mods = modules(src)
    for m, f in mods.items():
        for t, line, _ in imports(f):
            if t in mods and layer_of(t) > layer_of(m):
                bad.append(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]}) at line {line}")
    return bad


def circles(src: Path) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    g = graph(src)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def hidden_imports(src: Path) -> list[str]:
    """Function-local imports that are not allowed: everywhere but `sqgan.cli` (which loads each command's stack on
    demand), only an optional heavy dependency may be imported inside a function, under an `# on demand` comment."""
    bad = []
    for m, f in modules(src).items():
        lines = f.read_text().splitlines()
        for t, line, local in imports(f):
            if not local or m == "sqgan.cli" and t.startswith("sqgan"):
                continue
            commented = any("# on demand" in lines[i] for i in range(max(0, line - 4), line))
            allowed = t.split(".")[0] in ON_DEMAND or m == "sqgan.io" and t == "torch"
            message = f"{m}: line {line} imports inside a function"
            if not (allowed and commented) and message not in bad:
                bad.append(message)
    return bad


def spelled_tags(src: Path) -> list[str]:
    """MLflow tag names spelled outside `sqgan/tags.py` (their one home): a string equal to a tag name, a query
    naming one (`tags.<name>`), or an f-string built on a tag prefix (`sqgan.metric.`, `sqgan.resume.`)."""
    names = {}
    for node in ast.parse((src / "sqgan" / "tags.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            target = node.targets[0]
            if isinstance(target, ast.Name) and not target.id.startswith("STAGE_") and target.id != "COMMAND":
                names[node.value.value] = target.id
    prefixes = [v for v in names if v.endswith(".")] + ["sqgan.resume."]
    found = []
    for m, f in modules(src).items():
        if m == "sqgan.tags":
            continue
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            parts: list[str] = []
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                parts = [node.value]
            if isinstance(node, ast.JoinedStr):
                parts = [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            for text in parts:
                hit = (text in names or any(f"tags.{v}" in text or f"tags.`{v}`" in text for v in names)
                       or isinstance(node, ast.JoinedStr) and any(text.startswith(p) for p in prefixes))
                if hit:
                    found.append(f"{m}: line {node.lineno} spells the tag {text!r}")
    return found


# --------------------------------------------------------------------------------------------------- the tree
def test_every_module_sits_in_a_layer():
    homeless = []
    for m in modules(SRC):
        try:
            layer_of(m)
        except KeyError:
            homeless.append(m)
    assert not homeless, f"modules outside every layer (add them to a layer's folder, ARCHITECTURE.md): {homeless}"


def test_no_module_imports_from_a_layer_above_its_own():
    assert not upward_imports(SRC)


def test_there_is_no_import_circle():
    assert not circles(SRC)


def test_imports_sit_at_the_top_of_their_module():
    assert not hidden_imports(SRC)


def test_mlflow_tag_names_are_spelled_only_in_tags_py():
    assert not spelled_tags(SRC)


@pytest.mark.parametrize("lib", ORCHESTRATION)
def test_core_and_loop_import_no_orchestration_library(lib):
    """The maths and the plain loop run without Ray, MLflow, DVC, KFP or Kubernetes installed."""
    for m, f in modules(SRC).items():
        if layer_of(m) <= layer_of("sqgan.train"):
            assert not [t for t, _, _ in imports(f) if t == lib or t.startswith(lib + ".")], (m, lib)


# ------------------------------------------------------------------------------------ the checks can fail
@pytest.fixture()
def tree(tmp_path):
    shutil.copytree(SRC / "sqgan", tmp_path / "sqgan")
    return tmp_path


def test_a_planted_upward_import_is_caught(tree):
    f = tree / "sqgan" / "quant" / "fq.py"
    f.write_text(f.read_text().replace("from sqgan.quant.common import", "from sqgan.shells.tracking import "
                                       "start_run\nfrom sqgan.quant.common import"))
    line = f.read_text().splitlines().index("from sqgan.shells.tracking import start_run") + 1
    assert upward_imports(tree) == [f"sqgan.quant.fq (core) imports sqgan.shells.tracking (shells) at line {line}"]


def test_a_planted_circle_is_caught_also_through_a_function_local_import(tree):
    f = tree / "sqgan" / "quant" / "common.py"
    f.write_text(f.read_text() + "\n\ndef _late():\n    from sqgan.quant.sq import StyleQuantizer\n")
    assert circles(tree) == [["sqgan.quant.common", "sqgan.quant.sq"]]
    line = len(f.read_text().splitlines())
    assert hidden_imports(tree) == [f"sqgan.quant.common: line {line} imports inside a function"]


def test_a_planted_tag_spelling_is_caught(tree):
    f = tree / "sqgan" / "shells" / "tune_report.py"
    f.write_text(f.read_text() + '\n\ndef _status(run):\n    return run.data.tags.get("sqgan.trial_status")\n')
    line = len(f.read_text().splitlines())
    assert spelled_tags(tree) == [f"sqgan.shells.tune_report: line {line} spells the tag 'sqgan.trial_status'"]


def test_a_module_outside_the_layers_is_named(tree):
    (tree / "sqgan" / "helpers.py").write_text("X = 1\n")
    assert "sqgan.helpers" in [m for m in modules(tree) if not _placed(m)]


def _placed(m: str) -> bool:
    try:
        layer_of(m)
    except KeyError:
        return False
    return True


def test_no_two_modules_share_a_name():
    """A name says which module it is (no `features.py` in two folders, no `prior.py` beside `prior.py`)."""
    names: dict[str, list[str]] = {}
    for m in modules(SRC):
        if m != "sqgan" and not (SRC / Path(*m.split("."))).is_dir():
            names.setdefault(m.rsplit(".", 1)[-1], []).append(m)
    assert not {k: v for k, v in names.items() if len(v) > 1}
