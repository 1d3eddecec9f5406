"""The dashboard in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) opens a real
`mlflow server` — the `make ui` view — finds a run, its FID and its sample grid there, and then opens a report
`sqgan report` rendered from that server and checks every image in it loads.

The run is logged the way a training logs it (params, a quality metric over steps, the grid artifact) but without
training: a Ray job would cost ~25 s and test nothing the browser sees that these calls do not. Skipped only when
no browser binary exists (`.ci/run` installs one)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_remote_mlflow import mlflow_server  # noqa: F401 - the real server fixture (sqlite backend, proxied artifacts)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GRID_SIZE = (64, 48)  # width, height: what the UI's <img> of the artifact must decode to
FID_STEPS = {10: 40.5, 20: 31.25, 30: 27.125}  # step → fid500_train_randcnn
TIMEOUT_MS = 60_000  # the UI's first load compiles a large bundle: seconds on an idle box, more under load

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no browser binary at {CHROMIUM}: "
                                "apt-get install chromium chromium-driver (.ci/run does it)")


@dataclass
class LoggedRun:
    uri: str
    experiment_id: str
    run_id: str
    name: str


@pytest.fixture(scope="module")
def logged_run(mlflow_server: tuple[str, Path],  # noqa: F811 - the fixture imported above
               tmp_path_factory: pytest.TempPathFactory) -> LoggedRun:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from PIL import Image

    uri, _ = mlflow_server
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("dashboard")
    name = "dcgan-fq16-s0"
    rid = client.create_run(exp, run_name=name, tags={"sqgan.stage": "train"}).info.run_id
    params = {"model.arch": "dcgan", "fq.codebook_size": "16", "fq.decay": "0.9", "train.steps": "30"}
    metrics = [Metric("fid500_train_randcnn", v, 0, s) for s, v in FID_STEPS.items()]
    metrics += [Metric("sq/utilisation", 0.25 * i, 0, s) for i, s in enumerate(FID_STEPS, 1)]
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    grid = tmp_path_factory.mktemp("grid") / "grid.png"
    img = Image.new("RGB", GRID_SIZE, (20, 20, 20))
    img.paste((230, 120, 0), (0, 0, GRID_SIZE[0] // 2, GRID_SIZE[1] // 2))
    img.save(grid)
    client.log_artifact(rid, str(grid), "samples")
    client.set_terminated(rid)
    return LoggedRun(uri, exp, rid, name)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A headless Chromium with a fresh profile; yields its context."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=ARGS)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


def test_mlflow_ui_shows_the_run_its_fid_and_its_sample_grid(logged_run: LoggedRun, browser) -> None:
    page = browser.new_page()
    page.goto(f"{logged_run.uri}/#/experiments/{logged_run.experiment_id}")
    # MLflow 3 opens experiments in its GenAI view; a GAN run lives under "Model training"
    page.get_by_text("Model training", exact=True).first.click()
    page.get_by_role("link", name=logged_run.name).first.click()  # the run, in the experiment's runs table
    page.wait_for_url(f"**/runs/{logged_run.run_id}**")
    page.get_by_text(logged_run.run_id, exact=True).first.wait_for()
    metric = page.get_by_role("row").filter(has_text="fid500_train_randcnn").first
    metric.wait_for()
    assert str(FID_STEPS[max(FID_STEPS)]) in metric.inner_text()  # the last logged value
    assert page.get_by_role("row").filter(has_text="fq.codebook_size").first.inner_text().split()[-1] == "16"

    page.get_by_role("tab", name="Artifacts").first.click()
    page.get_by_text("samples", exact=True).first.click()
    page.get_by_text("grid.png", exact=True).first.click()
    w, h = GRID_SIZE
    page.wait_for_function(f"() => Array.from(document.images).some(i => i.complete && i.naturalWidth === {w} "
                           f"&& i.naturalHeight === {h})")
    page.close()


def test_every_image_of_a_report_rendered_from_the_server_loads(logged_run: LoggedRun, browser, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from sqgan.commands.report import render_report

    out = tmp_path / "report"
    res = render_report(logged_run.uri, out, experiment="dashboard", log=True, progress=False)
    assert res.runs == [logged_run.run_id]
    logged = {f.path for f in MlflowClient(tracking_uri=logged_run.uri).list_artifacts(res.logged_to, "report")}
    assert "report/report.html" in logged

    page = browser.new_page()
    page.goto((out / "report.html").as_uri())
    page.wait_for_load_state("load")
    images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
                           "i.naturalWidth, i.naturalHeight])")
    srcs = [src for src, *_ in images]
    assert srcs == ["quality_curves.png", f"grids/{logged_run.run_id}.png", "codebook_usage.png"]
    for src, complete, width, height in images:
        assert complete and width > 0 and height > 0, src
    assert [width for src, _, width, _ in images if src.startswith("grids/")] == [GRID_SIZE[0]]
    assert logged_run.run_id in page.inner_text("body")
    page.close()
