"""The stage table (`sqgan.data.stages.STAGES`) is the one source of a dataset stage: the `sqgan data` commands, the
Kubeflow components, the DVC stages and the params sections are checked against it here, so a stage added to (or
dropped from) the table and not to its command, component, DVC stage or params fails a test naming what is missing.
(`tests/test_stage_deps.py` checks each DVC stage's deps against the modules the stage runs.)"""

from __future__ import annotations

import ast

import typer.main
import yaml
from conftest import ROOT

from sqgan.cli import app
from sqgan.config import Params, default_params
from sqgan.data.stages import PREPARABLE, STAGES

COMMON = {"out", "src", "force", "params", "set_", "no_params_file", "delete_unknown"}  # every data command's
NOT_STAGES = {"download", "fetch", "prepare"}  # `sqgan data` commands that run no table stage


def _data_commands() -> dict[str, object]:
    group = typer.main.get_command(app).commands["data"]
    return dict(group.commands)


def _components() -> dict[str, str]:
    """component function name → the stage its body runs (the first argument of its data_task call)."""
    tree = ast.parse((ROOT / "components" / "data.py").read_text())
    out = {}
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "data_task":
                    out[fn.name] = node.args[0].value
    return out


def _section(p: Params, dotted: str):
    node = p
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_every_stage_has_a_data_command_whose_options_are_keys_of_its_section():
    commands = _data_commands()
    p = default_params()
    for name, stage in STAGES.items():
        command = "curate" if stage.function.endswith(":curate") and name != "curate" else name
        if name in PREPARABLE and name not in commands:  # metfaces: built by `sqgan data prepare` only
            continue
        assert command in commands, f"stage {name!r} has no `sqgan data {command}` command (src/sqgan/cli.py)"
        options = {prm.name for prm in commands[command].params} - COMMON
        section = type(_section(p, stage.section))
        bad = sorted(options - set(section.model_fields))
        assert not bad, f"`sqgan data {command}` options {bad} are not keys of {stage.section} (each becomes --set)"
    extra = set(commands) - set(STAGES) - NOT_STAGES
    assert not extra, f"`sqgan data` commands {sorted(extra)} run no stage of the table"


def test_prepare_takes_every_real_dataset_and_few_shot_stage():
    assert set(PREPARABLE) == {"ffhq2k5", "brecahad", "dogface", "metfaces", "fewshot100", "cifar10", "cifar100",
                               "subset", "selffilter"}


def test_every_stage_has_one_kfp_component_that_runs_it():
    comps = _components()
    ran = sorted(comps.values())
    assert sorted(set(ran)) == ran, f"two components run one stage: {ran}"
    missing = sorted(set(STAGES) - set(ran))
    assert not missing, f"stages {missing} have no component in components/data.py (copy `subset`)"
    assert set(ran) <= set(STAGES)


def test_every_preparable_stage_is_a_dvc_stage_and_reads_its_params_section():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in PREPARABLE:
        assert name in stages, f"stage {name!r} is missing from dvc.yaml (`cmd: sqgan data prepare {name}`)"
        assert stages[name]["cmd"] == f"sqgan data prepare {name}"
    assert stages["demo_data"]["cmd"].startswith("sqgan data demo ")


def test_every_stage_section_is_in_the_schema_and_in_params_yaml():
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = default_params(["data.ffhq2k5.features=pixels"])  # its arguments build the extractor: no BLIP download
    for name, stage in STAGES.items():
        _section(p, stage.section)  # AttributeError names it
        node = shipped
        for part in stage.section.split("."):
            assert part in node, f"params.yaml lacks {stage.section} (stage {name!r})"
            node = node[part]
        stage.arguments(p)  # the table's params → arguments mapping reads only keys that exist
