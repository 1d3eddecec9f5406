"""`sqgan report` from MLflow alone: the runs table, curves, grids and usage plots of an experiment, a sweep's axes,
the paper table (mean ± std over seeds of each run's best value), and errors that name the input. The runs are
logged straight into a sqlite MLflow under tmp_path (no training), so every expected number is known here."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sqgan.commands.report import ReportError, render_report, write_table

PNG = b"\x89PNG\r\n\x1a\n"
# each run's best (minimum) FID over its logged steps, per (data.dataset, fq.enabled), seeds 0, 1, 2
BEST_FID = {("brecahad", "false"): [30.0, 34.0, 32.0], ("brecahad", "true"): [20.0, 21.0, 25.0],
            ("demo", "false"): [10.0, 12.0, 14.0], ("demo", "true"): [13.0, 15.0, 14.0]}
# each run's best (maximum) recall
BEST_RECALL = {("brecahad", "false"): [0.40, 0.42, 0.44], ("brecahad", "true"): [0.50, 0.60, 0.70],
               ("demo", "false"): [0.50, 0.55, 0.60], ("demo", "true"): [0.70, 0.72, 0.74]}
FID, RECALL, INTERIM_FID, KID = ("fid500_train_randcnn", "recall500_train_randcnn", "fid100_train_randcnn",
                                 "kid500_train_randcnn")


@dataclass
class Store:
    uri: str
    runs: dict[tuple[str, str, int], str] = field(default_factory=dict)  # (dataset, fq, seed) → run id
    prior: str = ""
    sweep: str = ""
    trials: list[str] = field(default_factory=list)


def _png(path: Path, color: tuple[int, int, int]) -> Path:
    from PIL import Image

    Image.new("RGB", (16, 16), color).save(path)
    return path


def _log(client, run_id: str, key: str, values: list[float], steps: list[int]) -> None:
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(key, v, 0, s) for v, s in zip(values, steps, strict=True)])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Experiment `paper`: 2 datasets × FQ off/on × 3 seeds, each with FID histories (final N = 500, interim
    N = 100), recall, KID, codebook usage and a sample grid, plus a prior run; experiment `sweep`: a parent and 4
    nested trials; `mixed`: two runs with different FIDs; `empty`: no runs."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    s = Store(f"sqlite:///{root / 'mlflow.db'}")
    client = MlflowClient(tracking_uri=s.uri)

    def experiment(name: str) -> str:
        return client.create_experiment(name, artifact_location=(root / "artifacts" / name).as_uri())

    paper = experiment("paper")
    for (ds, fq), bests in BEST_FID.items():
        for seed, best in enumerate(bests):
            run = client.create_run(paper, run_name=f"{ds}-fq{fq}-s{seed}", tags={"sqgan.stage": "train"})
            rid = run.info.run_id
            params = {"data.dataset": ds, "fq.enabled": fq, "train.seed": str(seed), "model.arch": "dcgan"}
            for k, v in params.items():
                client.log_param(rid, k, v)
            _log(client, rid, FID, [best + 5, best, best + 2], [100, 200, 300])  # best in the middle, not last
            _log(client, rid, INTERIM_FID, [best + 9, best + 7, best + 6], [50, 150, 250])
            r = BEST_RECALL[(ds, fq)][seed]
            _log(client, rid, RECALL, [r - 0.1, r, r - 0.05], [100, 200, 300])
            _log(client, rid, f"{KID}_mean", [0.0123], [300])
            _log(client, rid, f"{KID}_std", [0.0011], [300])
            _log(client, rid, "sq/utilisation", [0.2, 0.5, 0.8], [10, 20, 30])
            _log(client, rid, "fq/layer1/perplexity", [3.0, 5.0, 6.0], [10, 20, 30])
            _log(client, rid, "d/feature_similarity", [0.9, 0.7], [15, 30])
            _log(client, rid, "loss/d", [1.0, 0.9, 0.8], [10, 20, 30])
            client.log_artifact(rid, str(_png(root / "grid.png", (40 * seed, 100, 200 if fq == "true" else 0))),
                                "samples")
            client.set_terminated(rid)
            s.runs[(ds, fq, seed)] = rid
    s.prior = client.create_run(paper, run_name="prior", tags={"sqgan.stage": "prior"}).info.run_id

    sweep = experiment("sweep")
    axes = ["fq.codebook_size", "fq.decay", "fq.alpha"]
    s.sweep = client.create_run(sweep, run_name="sweep-parent", tags={
        "sqgan.stage": "sweep", "sqgan.tune.axes": json.dumps(axes),
        "sqgan.tune.metric": "kid", "sqgan.tune.metric_key": f"{KID}_mean",
        "sqgan.tune.interim_key": "kid100_train_randcnn_mean", "sqgan.tune.mode": "min"}).info.run_id
    for i, (k, decay) in enumerate([(16, 0.8), (16, 0.9), (64, 0.8), (64, 0.9)]):
        trial = client.create_run(sweep, run_name=f"trial-{i}", tags={
            "sqgan.stage": "trial", "mlflow.parentRunId": s.sweep, "sqgan.trial_id": f"t{i}",
            "sqgan.trial_status": "completed", "sqgan.stopped_at_step": "60"}).info.run_id
        values = {"fq.codebook_size": k, "fq.decay": decay, "fq.alpha": 1.0}
        for key, v in values.items():
            client.log_param(trial, key, str(v))
        client.log_text(trial, yaml.safe_dump({"fq": {"codebook_size": k, "decay": decay}}), "params.yaml")
        _log(client, trial, "kid100_train_randcnn_mean", [0.05 + i / 100, 0.04 + i / 100], [20, 40])
        _log(client, trial, f"{KID}_mean", [0.03 + i / 100], [60])
        _log(client, trial, "fid500_train_randcnn", [9.0 + i], [60])
        client.log_artifact(trial, str(_png(root / "grid.png", (0, 60 * i, 0))), "samples")
        client.set_terminated(trial)
        s.trials.append(trial)
    client.set_terminated(s.sweep)

    mixed = experiment("mixed")
    for key in ("fid500_train_randcnn", "fid1k_train_randcnn"):
        rid = client.create_run(mixed, run_name=key).info.run_id
        client.log_param(rid, "data.dataset", "demo")
        client.log_param(rid, "fq.enabled", "true")
        _log(client, rid, key, [3.0], [10])
    experiment("empty")
    return s


def _md_rows(md: str) -> list[dict[str, str]]:
    """The first markdown table of `md` as dicts."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for ln in lines[2:]:
        if ln.startswith("|---"):
            break
        rows.append(dict(zip(head, (c.strip() for c in ln.strip("|").split(" | ")), strict=True)))
    return rows


def _is_png(path: Path) -> bool:
    from PIL import Image

    if not path.is_file() or path.stat().st_size == 0 or path.read_bytes()[:8] != PNG:
        return False
    with Image.open(path) as im:
        return im.width > 0 and im.height > 0


def test_report_holds_every_run_its_last_metrics_and_differing_params_and_every_image_it_links(store, tmp_path):
    out = tmp_path / "report"
    res = render_report(store.uri, out, experiment="paper", log=False, progress=False)
    html, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert sorted(res.runs) == sorted(store.runs.values()) and res.logged_to is None
    for rid in store.runs.values():
        assert rid in html and rid in md
    assert store.prior not in html  # a codebook prior is no GAN run

    rows = {r["run_id"]: r for r in _md_rows(md)}
    assert set(rows) == set(store.runs.values())
    head = list(next(iter(rows.values())))
    assert head[:6] == ["run_id", "name", "status", "data.dataset", "fq.enabled", "train.seed"]  # differing only
    assert "model.arch" not in head and "`model.arch=dcgan`" in md  # constant params once, below
    row = rows[store.runs[("demo", "false", 0)]]
    assert row["name"] == "demo-fqfalse-s0" and row["status"] == "FINISHED"
    assert row[FID] == "12"  # the last logged value (10 + 2), not the best (10)
    assert row[INTERIM_FID] == "16" and row[RECALL] == "0.45"
    assert row[KID] == "0.0123 ± 0.0011"  # the _mean/_std pair in one cell
    assert row["sq/utilisation"] == "0.8" and row["fq/layer1/perplexity"] == "6"
    assert row["d/feature_similarity"] == "0.7" and "loss/d" not in row

    # every image the HTML shows exists beside it, by a relative path, as a non-empty PNG
    srcs = re.findall(r"<img [^>]*src='([^']+)'", html)
    assert len(srcs) == 2 + len(store.runs)  # quality curves, usage, one grid per run
    for src in srcs:
        assert not src.startswith(("/", "file:")) and _is_png(out / src), src
    for rid in store.runs.values():
        assert f"grids/{rid}.png" in srcs
    # every PNG of the folder is listed in the markdown; the DVC plots are among them
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == sorted(res.images)
    for png in pngs:
        assert f"]({png})" in md and _is_png(out / png), png
    assert {"quality_curves.png", "grids.png", "codebook_usage.png"} <= set(pngs)
    # each quality name logged at > 1 step is its own series (the interim N differs from the final N); KID, logged
    # once, is not a curve
    note = re.search(r"<h2>Quality over training</h2>\s*<p class='note'>([^<]*)</p>", html)
    assert note is not None and note.group(1).split(", ") == [FID, INTERIM_FID, RECALL]


def test_report_run_is_logged_and_later_reports_leave_it_out(store, tmp_path):
    from mlflow.tracking import MlflowClient

    first = render_report(store.uri, tmp_path / "a", experiment="paper", log=True, progress=False)
    client = MlflowClient(tracking_uri=store.uri)
    run = client.get_run(first.logged_to)
    assert run.data.tags["sqgan.stage"] == "report" and run.info.status == "FINISHED"
    assert run.info.run_id not in store.runs.values()
    logged = {f.path for f in client.list_artifacts(first.logged_to, "report")}
    assert {"report/report.html", "report/report.md", "report/quality_curves.png", "report/grids"} <= logged
    assert "report/.sqgan-stage.json" not in logged
    second = render_report(store.uri, tmp_path / "b", experiment="paper", log=False, progress=False)
    assert first.logged_to not in second.runs and first.logged_to not in (tmp_path / "b" / "report.html").read_text()


def test_report_of_one_sweep_shows_the_metric_against_each_axis_and_is_logged_onto_the_parent(store, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "sweep-report"
    res = render_report(store.uri, out, run_ids=[store.sweep], log=True, progress=False)
    assert sorted(res.runs) == sorted(store.trials) and res.sweeps == [store.sweep]
    assert res.logged_to == store.sweep  # one sweep: onto its parent, no new run
    html = (out / "report.html").read_text()
    folder = out / "sweeps" / store.sweep
    for name in ("metric_vs_axes.png", "curves.png"):
        assert _is_png(folder / name) and f"src='sweeps/{store.sweep}/{name}'" in html
    assert yaml.safe_load((folder / "best_params.yaml").read_text()) == {"fq": {"codebook_size": 16, "decay": 0.8}}
    for trial in store.trials:
        assert trial in html
    logged = {f.path for f in MlflowClient(tracking_uri=store.uri).list_artifacts(store.sweep, "report")}
    assert "report/report.html" in logged and "report/sweeps" in logged


def test_experiment_report_gives_each_sweep_parent_a_section_not_a_row(store, tmp_path):
    res = render_report(store.uri, tmp_path / "r", experiment="sweep", log=False, progress=False)
    assert sorted(res.runs) == sorted(store.trials) and res.sweeps == [store.sweep]
    assert f"## Sweep sweep-parent ({store.sweep})" in (tmp_path / "r" / "report.md").read_text()


def test_report_replaces_its_earlier_report_but_never_a_folder_it_did_not_write(store, tmp_path):
    out = tmp_path / "r"
    render_report(store.uri, out, experiment="sweep", log=False, progress=False)
    render_report(store.uri, out, experiment="sweep", log=False, progress=False)  # its own earlier output
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="no sqgan stage wrote"):
        render_report(store.uri, other, experiment="sweep", log=False, progress=False)
    assert sorted(p.name for p in other.iterdir()) == ["mine.txt"]


def _table_csv(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    rows = csv.DictReader(io.StringIO((out / "table.csv").read_text()))
    return {(r["data.dataset"], r["fq.enabled"]): r for r in rows}


def test_table_cells_are_mean_and_sample_std_over_seeds_of_each_runs_minimum_fid(store, tmp_path):
    out = tmp_path / "table"
    res = write_table(store.uri, out, "data.dataset", "fq.enabled", experiment="paper", log=False, progress=False)
    assert res.table.metric == FID  # the shared FID with the most images, not the interim one (N = 100)
    # by hand: mean and sample std (n − 1) of the best values
    expected = {("brecahad", "false"): (32.0, 2.0), ("brecahad", "true"): (22.0, 7 ** 0.5),
                ("demo", "false"): (12.0, 2.0), ("demo", "true"): (14.0, 1.0)}
    got = _table_csv(out)
    assert set(got) == set(expected)
    for group, (mean, std) in expected.items():
        assert float(got[group]["mean"]) == pytest.approx(mean)
        assert float(got[group]["std"]) == pytest.approx(std)
        assert got[group]["n"] == "3"
    md = (out / "table.md").read_text()
    assert "| data.dataset \\ fq.enabled | false | true |" in md
    assert "| brecahad | 32.0 ± 2.0 | **22.0 ± 2.6** |" in md
    assert "| demo | **12.0 ± 2.0** | 14.0 ± 1.0 |" in md
    tex = (out / "table.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"brecahad & $32.0 \pm 2.0$ & $\mathbf{22.0 \pm 2.6}$ \\" in tex
    assert r"demo & $\mathbf{12.0 \pm 2.0}$ & $14.0 \pm 1.0$ \\" in tex
    assert r"data.dataset & \multicolumn{2}{c}{fq.enabled} \\" in tex


def test_table_of_recall_takes_each_runs_maximum_and_bolds_the_highest(store, tmp_path):
    out = tmp_path / "recall"
    res = write_table(store.uri, out, "data.dataset", "fq.enabled", metric=RECALL, experiment="paper", log=False,
                      progress=False)
    assert res.table.mode == "max"
    got = _table_csv(out)
    assert float(got[("demo", "true")]["mean"]) == pytest.approx(0.72)
    assert float(got[("demo", "true")]["std"]) == pytest.approx(0.02)
    assert float(got[("brecahad", "true")]["mean"]) == pytest.approx(0.60)
    assert float(got[("brecahad", "true")]["std"]) == pytest.approx(0.10)
    md = (out / "table.md").read_text()
    assert "| demo | 0.550 ± 0.050 | **0.720 ± 0.020** |" in md
    assert "| brecahad | 0.420 ± 0.020 | **0.600 ± 0.100** |" in md


def test_table_groups_by_tags_too_and_notes_runs_without_the_metric(store, tmp_path):
    res = write_table(store.uri, tmp_path / "t", "fq.codebook_size", "sqgan.trial_status", metric="kid500_train_"
                      "randcnn_mean", run_ids=[store.sweep], log=False, progress=False)
    assert res.table.row_values == ["16", "64"] and res.table.col_values == ["completed"]
    assert res.table.cells[("16", "completed")].best == pytest.approx([0.03, 0.04])
    assert res.logged_to is None and not res.table.left_out


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"experiment": "nope"}, ["--experiment 'nope': no such experiment", "'paper'"]),
    ({"experiment": "empty"}, ["--experiment 'empty'", "has no runs", "sqgan train"]),
    ({"run_ids": ["0" * 32]}, ["--runs " + "0" * 32 + ": no such run", "MLflow UI"]),
])
def test_bad_report_inputs_fail_naming_the_input_and_the_fix(store, tmp_path, kwargs, words):
    with pytest.raises(ReportError) as e:
        render_report(store.uri, tmp_path / "r", log=False, progress=False, **kwargs)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "r").exists()


def test_a_missing_database_is_named_and_not_created(tmp_path):
    db = tmp_path / "nowhere.db"
    with pytest.raises(ReportError, match="no MLflow database at .*nowhere.db"):
        render_report(f"sqlite:///{db}", tmp_path / "r", experiment="paper", log=False, progress=False)
    assert not db.exists()


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"metric": "fid50k_train_inception"}, ["--metric 'fid50k_train_inception': none of the 12 runs", FID]),
    ({"rows": "data.datset"}, ["--table ROWS 'data.datset'", "did you mean 'data.dataset'"]),
    ({"experiment": "mixed"}, ["share no FID", "fid1k_train_randcnn", "fid500_train_randcnn", "--metric"]),
])
def test_bad_table_inputs_fail_naming_the_input_and_the_fix(store, tmp_path, kwargs, words):
    rows = kwargs.pop("rows", "data.dataset")
    kwargs.setdefault("experiment", "paper")
    with pytest.raises(ReportError) as e:
        write_table(store.uri, tmp_path / "t", rows, "fq.enabled", log=False, progress=False, **kwargs)
    for w in words:
        assert w in str(e.value)


def test_sqgan_report_command_renders_the_report_and_the_table(store, tmp_path):
    from sqgan.cli import app

    runner = CliRunner()
    base = ["report", "--no-params-file", "--tracking-uri", store.uri, "--no-log"]
    r = runner.invoke(app, [*base, "--experiment", "sweep", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert str(tmp_path / "r" / "report.html") in r.output and (tmp_path / "r" / "report.md").is_file()
    r = runner.invoke(app, [*base, "--experiment", "paper", "--table", "data.dataset", "fq.enabled",
                            "--out", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    assert "| demo | **12.0 ± 2.0** | 14.0 ± 1.0 |" in r.output and (tmp_path / "t" / "table.tex").is_file()
    r = runner.invoke(app, [*base, "--experiment", "nope", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "no such experiment" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, [*base, "--metric", FID, "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--metric" in r.output and "--table" in r.output


def test_search_all_follows_every_page():
    from sqgan.shells.tracking import search_all

    class Page(list):
        token: str | None = None

    class Client:  # MLflow returns at most max_results runs and a token for the next page
        def __init__(self) -> None:
            self.calls: list[str | None] = []

        def search_runs(self, ids, filter_string, max_results, order_by, page_token):
            self.calls.append(page_token)
            page = Page(range(int(page_token or 0), int(page_token or 0) + 3))
            page.token = str(int(page_token or 0) + 3) if len(self.calls) < 3 else None
            return page

    client = Client()
    assert search_all(client, "0") == list(range(9)) and client.calls == [None, "3", "6"]
