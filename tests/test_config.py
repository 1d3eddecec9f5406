"""Params: one schema, overrides, and errors that name the key path (exit status 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sqgan.cli import app
from sqgan.config import ConfigError, Params, default_params, load_params

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_bad_value_exits_2_naming_key_value_and_range():
    r = runner.invoke(app, ["config", "validate", "--params", str(ROOT / "params.yaml"), "--set", "fq.decay=1.5"])
    assert r.exit_code == 2
    assert "fq.decay" in r.output and "1.5" in r.output and "[0.0, 1.0)" in r.output


def test_unknown_key_exits_2_and_suggests_closest_key():
    r = runner.invoke(app, ["config", "validate", "--params", str(ROOT / "params.yaml"),
                            "--set", "fq.codebook_sise=8"])
    assert r.exit_code == 2
    assert "fq.codebook_sise" in r.output and "did you mean 'fq.codebook_size'" in r.output


def test_unknown_key_in_params_file_names_file_and_key(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  stesp: 3\n")
    with pytest.raises(ConfigError, match=r"p.yaml: unknown key 'train.stesp'; did you mean 'train.steps'"):
        load_params(f)


def test_override_parses_yaml_values_and_wins_over_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("fq:\n  codebook_size: 8\n  layers: [0]\n")
    p = load_params(f, ["fq.codebook_size=128", "fq.layers=[0, 2]", "metrics.inception_weights=null",
                        "train.diffaugment=[]"])
    assert p.fq.codebook_size == 128 and p.fq.layers == [0, 2]
    assert p.metrics.inception_weights is None and p.train.diffaugment == []
    assert p.fq.decay == Params().fq.decay  # untouched keys keep their defaults


@pytest.mark.parametrize(
    "item, words",
    [
        ("fq.codebook_size=12", ["fq.codebook_size", "power of two", "12"]),
        ("fq.layers=[3]", ["fq.layers", "0..2", "[3]"]),
        ("model.resolution=48", ["model.resolution", "power of two", "48"]),
        ("fq.decay", ["key.path=value"]),
        ("fq.decay.x=1", ["'fq.decay' is a value"]),
    ],
)
def test_bad_overrides_name_the_key(item, words):
    with pytest.raises(ConfigError) as e:
        load_params(ROOT / "params.yaml", [item])
    for w in words:
        assert w in str(e.value)


def test_missing_params_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_project_params_file_declares_every_schema_key():
    import yaml

    from sqgan.config import flatten

    declared = flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert set(declared) == set(Params().flat())
    # and with the schema's defaults: `make demo` reads params.yaml, the tests build from the schema
    assert {k: v for k, v in declared.items() if v != Params().flat()[k]} == {}


def test_config_show_prints_each_key_with_its_doc():
    r = runner.invoke(app, ["config", "show", "--params", str(ROOT / "params.yaml"), "--set", "fq.alpha=0.5"])
    assert r.exit_code == 0
    line = next(ln for ln in r.output.splitlines() if ln.strip().startswith("alpha:"))
    assert "0.5" in line and "weight α" in line
    n_keys = sum(1 for ln in r.output.splitlines() if "[" in ln.split("#")[-1])
    assert n_keys == len(Params().flat())


def test_set_can_mend_a_bad_value_in_the_file_and_a_bad_file_names_itself(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("fq:\n  decay: 1.5\n")
    assert load_params(f, ["fq.decay=0.5"]).fq.decay == 0.5
    with pytest.raises(ConfigError, match=r"p.yaml: fq.decay must be float in \[0.0, 1.0\), got 1.5"):
        load_params(f)


def test_schema_defaults_equal_the_shipped_params_yaml():
    """`--no-params-file` (or a library call) and the project's params.yaml must mean the same run."""
    shipped = load_params(ROOT / "params.yaml").model_dump(mode="json")
    assert default_params().model_dump(mode="json") == shipped
    assert shipped["ray"]["cpus_per_worker"] == 2


@pytest.mark.parametrize(("text", "words"), [
    ("", "is empty (or only comments)"),
    ("# every key commented out\n# fq:\n#   decay: 0.8\n", "is empty (or only comments)"),
    ("- a\n- b\n", "expected a mapping of sections"),
    ("fq: [1\n", "not valid YAML"),
])
def test_an_empty_or_non_mapping_params_file_is_an_error_not_the_defaults(tmp_path, text, words):
    f = tmp_path / "params.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert words in str(e.value) and str(f) in str(e.value)


def test_no_params_file_in_the_folder_is_an_error_unless_defaults_are_asked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["config", "show"])
    assert r.exit_code == 2 and "params.yaml: params file not found" in r.output and "--no-params-file" in r.output
    r = runner.invoke(app, ["config", "show", "--no-params-file", "--set", "fq.decay=0.7"])
    assert r.exit_code == 0 and "decay: 0.7" in r.output
    r = runner.invoke(app, ["config", "show", "--no-params-file", "--params", str(ROOT / "params.yaml")])
    assert r.exit_code == 2 and "contradict" in r.output


def test_params_given_as_a_folder_is_a_clear_error(tmp_path):
    r = runner.invoke(app, ["config", "validate", "--params", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder, not a params file" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize(("given", "expect"), [
    ("true", "true"), ("True", "true"), ("yes", "true"), ("on", "true"), ("false", "false"), ("FALSE", "false"),
    ("no", "false"), ("auto", "auto"),
])
def test_use_gpu_accepts_the_usual_boolean_spellings(given, expect):
    assert default_params([f"train.use_gpu={given}"]).train.use_gpu == expect


@pytest.mark.parametrize("item", ["train.lr_g=0", "train.lr_g=-0.001", "train.lr_d=0", "train.lr_d=-1",
                                  "fq.decay=1.0", "fq.decay=-0.1", "train.use_gpu=maybe"])
def test_values_outside_their_range_are_refused(item):
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=rf"--set {item}: {key} must be"):
        default_params([item])
