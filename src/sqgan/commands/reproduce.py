"""`sqgan reproduce RUN_ID`: train a recorded run again from what MLflow holds, and compare the numbers.

It reads the run's params (its `params.yaml` artifact, validated by the params schema; the flat params when that
artifact is missing) and its provenance tags, and checks them against this checkout before Ray starts:

- `git_sha` against the checkout's commit (a recorded `-dirty` sha cannot be verified: git keeps no record of
  uncommitted changes), and `data.manifest_sha256` / `data.md5` against the data in the recorded `data.dir`;
- `version.*` against the installed packages. Those that compute the numbers (NUMERIC_PACKAGES) count like the
  code and the data; the others (ray, mlflow, dvc, …) are reported only.

A difference in a counted item refuses the reproduction (nothing is trained) unless `force`. Otherwise the run is
trained again with the recorded params (same seed) by `run_training`, into a new folder, as a new MLflow run in the
same experiment tagged `sqgan.reproduces=<old run id>`. Every metric of the two runs is compared at its last step
(timings excepted: they measure the machine); on the same kind of device they must be exactly equal.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal

import yaml
from mlflow.exceptions import MlflowException

from sqgan.config import ConfigError, Params, flatten, load_params
from sqgan.io import free_sibling, sha256_file, write_json_atomic
from sqgan.shells import ray_train, tracking
from sqgan.tags import (
    DATA_DIR,
    DATA_MANIFEST_SHA256,
    DATA_MD5,
    GIT_DIRTY,
    GIT_SHA,
    REPRODUCE_DIFFERING,
    REPRODUCE_EQUAL,
    REPRODUCE_FORCED,
    REPRODUCES,
    RUN_NAME,
    STAGE,
    STOPPED_AT_STEP,
    TRIAL_STATUS,
    VERSION,
)

REPORT_FILE = "reproduce.json"
TRAINING_STAGES = ("train", "trial")  # sqgan.stage of the runs that trained a model
NUMERIC_PACKAGES = ("sqgan", "torch", "torchvision", "numpy", "torchmetrics")  # their versions change the numbers


def is_timing(key: str) -> bool:
    """Metrics that measure the machine, not the model (never compared)."""
    return key.startswith("time/") or "/time/" in key or "throughput" in key or key.endswith("_per_s")


@dataclass
class Check:
    """One provenance item of the recorded run against this checkout."""

    item: str  # "git_sha", "data.manifest_sha256", "version.torch", … (the tag it checks)
    recorded: str
    now: str
    status: Literal["same", "differs", "unverifiable"]
    counts: bool  # a difference refuses the reproduction (unless force)
    note: str = ""

    def line(self) -> str:
        if self.status == "same":
            return f"  same          {self.item}: {self.recorded}"
        note = f" ({self.note})" if self.note else ""
        word = "DIFFERS" if self.status == "differs" else "UNVERIFIABLE"
        return f"  {word:13s} {self.item}: recorded {self.recorded}, now {self.now}{note}"


@dataclass
class RecordedRun:
    run_id: str
    tracking_uri: str
    experiment: str
    params: Params
    params_source: str  # "params.yaml" or "flat params"
    tags: dict[str, str]


@dataclass
class MetricRow:
    key: str
    recorded_step: int | None
    recorded: float | None
    new_step: int | None
    new: float | None

    @property
    def equal(self) -> bool:
        if self.recorded is None or self.new is None or self.recorded_step != self.new_step:
            return False
        return self.recorded == self.new or (math.isnan(self.recorded) and math.isnan(self.new))

    @property
    def difference(self) -> float | None:
        return None if self.recorded is None or self.new is None else self.new - self.recorded


@dataclass
class Comparison:
    rows: list[MetricRow]
    later: list[str] = field(default_factory=list)  # logged into the recorded run after its training: not compared

    @property
    def shared(self) -> list[MetricRow]:
        return [r for r in self.rows if r.recorded is not None and r.new is not None]

    @property
    def only_recorded(self) -> list[str]:
        return [r.key for r in self.rows if r.new is None]

    @property
    def only_new(self) -> list[str]:
        return [r.key for r in self.rows if r.recorded is None]

    @property
    def differing(self) -> list[str]:
        """Every key whose last value (or last step) differs, or that only one run logged."""
        return [r.key for r in self.rows if not r.equal]

    @property
    def equal(self) -> bool:
        return bool(self.rows) and not self.differing

    def table(self) -> str:
        head = f"{'metric':34s} {'step':>6s} {'recorded':>18s} {'new':>18s} {'difference':>12s}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            step = str(r.new_step if r.recorded_step is None else r.recorded_step)
            if r.recorded_step is not None and r.new_step is not None and r.recorded_step != r.new_step:
                step = f"{r.recorded_step}≠{r.new_step}"
            rec = "—" if r.recorded is None else f"{r.recorded:.12g}"
            new = "—" if r.new is None else f"{r.new:.12g}"
            d = r.difference
            diff = "only one run" if d is None else ("0" if r.equal else f"{d:+.3g}")
            lines.append(f"{r.key:34s} {step:>6s} {rec:>18s} {new:>18s} {diff:>12s}")
        if self.later:
            lines.append(f"not compared, logged into the recorded run after its training (sqgan eval, sqgan sample): "
                         f"{', '.join(self.later)}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "equal": self.equal,
            "differing": self.differing,
            "only_recorded": self.only_recorded,
            "only_new": self.only_new,
            "added_after_training": self.later,
            "metrics": {r.key: {"recorded_step": r.recorded_step, "recorded": r.recorded, "new_step": r.new_step,
                                "new": r.new, "difference": r.difference, "equal": r.equal} for r in self.rows},
        }


@dataclass
class Reproduction:
    """What `reproduce` did: the checks, the new run, the comparison and where it wrote its report."""

    reproduces: str
    run_id: str
    tracking_uri: str
    out_dir: Path
    checks: list[Check]
    forced: list[str]  # the counted items that differed and were overridden with force
    comparison: Comparison
    seconds: float
    params_changed: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def equal(self) -> bool:
        return self.comparison.equal


class ReproduceRefused(RuntimeError):
    """The checkout, the data or a numeric package differs from the record (and force was not given)."""


# ------------------------------------------------------------------------------------------- reading the run
def default_tracking_uri(project_dir: str | Path = ".") -> str:
    """$MLFLOW_TRACKING_URI, else the project's sqlite mlflow.db (as `sqgan train` with default params)."""
    return tracking.resolve_tracking_uri(Params(), project_dir)


def read_run(run_id: str, tracking_uri: str) -> RecordedRun:
    """The run's params and tags; a clear error for an unknown id or a run that trained nothing."""
    client = tracking.open_existing(tracking_uri, f"pass the one that holds run {run_id} with --tracking-uri (or set "
                                                  f"MLFLOW_TRACKING_URI)")
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"run {run_id} not found in {tracking_uri} ({e.error_code}); pass the run id that "
                         f"`sqgan train` printed (or the MLflow UI shows), with --tracking-uri if it is in another "
                         f"store") from None
    tags = dict(run.data.tags)
    stage = tags.get(STAGE)
    if stage not in TRAINING_STAGES:
        raise ValueError(f"run {run_id} is not a training run: its sqgan.stage tag is {stage!r}, reproduce takes "
                         f"{' or '.join(TRAINING_STAGES)} runs (for a sweep, reproduce one of its trials)")
    if run.info.status != "FINISHED" or tags.get(TRIAL_STATUS, "completed") != "completed":
        how = tags.get(TRIAL_STATUS) or run.info.status
        at = tags.get(STOPPED_AT_STEP)
        raise ValueError(f"run {run_id} did not finish ({how}{f' at step {at}' if at else ''}): its last metrics are "
                         f"not those of its params' full schedule; reproduce a finished run")
    params, source = _recorded_params(client, run_id, dict(run.data.params))
    experiment = client.get_experiment(run.info.experiment_id).name
    return RecordedRun(run_id, tracking_uri, experiment, params, source, tags)


def _recorded_params(client: Any, run_id: str, flat: dict[str, str]) -> tuple[Params, str]:
    """The params.yaml artifact through the params schema; the flat params (parsed as YAML) without it."""
    with tempfile.TemporaryDirectory(prefix="sqgan-reproduce-") as d:
        try:
            path = Path(client.download_artifacts(run_id, "params.yaml", d))
        except Exception:  # noqa: BLE001 - no such artifact (or an unreadable store): use the flat params
            path = None
        what = f"params.yaml of run {run_id}"
        if path is not None:
            try:
                return load_params(path), "params.yaml"
            except ConfigError as e:
                raise ConfigError(_schema_changed(str(e).replace(str(path), what))) from None
    if not flat:
        raise ValueError(f"run {run_id} recorded neither a params.yaml artifact nor params; it cannot be reproduced")
    raw: dict[str, Any] = {}
    for key, text in flat.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = None if text == "None" else _yaml_value(text)
    try:
        return Params().override(flatten(raw), source=f"params of run {run_id}"), "flat params"
    except ConfigError as e:
        raise ConfigError(_schema_changed(str(e))) from None


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _schema_changed(msg: str) -> str:
    return (f"{msg}\nThe recorded params no longer fit this checkout's params schema (the code changed since the run); "
            f"check out the commit the run recorded (its git_sha tag) and reproduce from there")


# ------------------------------------------------------------------------------------------- verification
def verify_provenance(tags: dict[str, str], project_dir: str | Path = ".") -> list[Check]:
    """The recorded git sha, data hashes and package versions against this checkout, one Check each."""
    now = tracking.git_sha(project_dir)
    checks = [_check_git(tags.get(GIT_SHA), now, tags.get(GIT_DIRTY),
                         tracking.git_dirty_files(project_dir) if now.endswith("-dirty") else [])]
    checks += _check_data(tags, Path(project_dir))
    now = tracking.package_versions()
    recorded = {k.removeprefix(VERSION): v for k, v in tags.items() if k.startswith(VERSION)}
    for name in sorted(set(recorded) | set(now)):
        was, cur = recorded.get(name, "not recorded"), now.get(name, "not tracked now")
        counts = name in NUMERIC_PACKAGES
        note = "it computes the numbers" if counts else "does not change the numbers"
        checks.append(Check(f"{VERSION}{name}", was, cur, "same" if was == cur else "differs", counts,
                            "" if was == cur else note))
    return checks


# tracked files that cannot change a run's numbers: a checkout (or a run) dirty only in these is its commit
NOT_CODE = ("dvc.lock", "*.md", "docs/*", "benchmarks/results/*", ".gitignore", ".dvcignore")


def _not_code(files: list[str]) -> bool:
    return all(any(fnmatch(f, pattern) for pattern in NOT_CODE) for f in files)


def _check_git(recorded: str | None, now: str, recorded_dirty: str | None = None,
               now_dirty: list[str] | None = None) -> Check:
    """The recorded commit against the checkout's. A -dirty side is verifiable when the files it changed are known
    and none of them is code (NOT_CODE: dvc.lock, docs); otherwise the note names the changed files."""
    now_dirty = now_dirty or []
    rec_files = [f for f in (recorded_dirty or "").split(",") if f]
    if not recorded or recorded == "unknown":
        return Check(GIT_SHA, recorded or "not recorded", now, "unverifiable", True,
                     "the run recorded no commit")
    if recorded.endswith("-dirty") and not (rec_files and _not_code(rec_files) and "…" not in recorded_dirty):
        what = f" to {', '.join(rec_files)}" if rec_files else ""
        return Check(GIT_SHA, recorded, now, "unverifiable", True,
                     f"the run had uncommitted changes{what}, which git does not record: its code cannot be verified")
    if now == "unknown":
        return Check(GIT_SHA, recorded, now, "unverifiable", True, "this folder is not a git checkout")
    base, now_base = recorded.removesuffix("-dirty"), now.removesuffix("-dirty")
    if now_base == base and (now == now_base or _not_code(now_dirty)):
        changed = sorted(set(rec_files) | set(now_dirty))
        return Check(GIT_SHA, recorded, now, "same", True,
                     f"the same commit; uncommitted changes only outside the code ({', '.join(changed)})"
                     if changed else "")
    if now_base == base:
        return Check(GIT_SHA, recorded, now, "differs", True,
                     f"this checkout has uncommitted changes to {', '.join(now_dirty) or 'tracked files'}; "
                     f"commit or stash them")
    return Check(GIT_SHA, recorded, now, "differs", True)


def data_folder(tags: dict[str, str], project_dir: str | Path) -> Path | None:
    """The dataset folder the run trained on (its data.dir tag; a relative one is under the project)."""
    where = tags.get(DATA_DIR)
    if not where:
        return None
    return Path(where) if Path(where).is_absolute() else Path(project_dir) / where


def _check_data(tags: dict[str, str], project_dir: Path) -> list[Check]:
    items = (DATA_MANIFEST_SHA256, DATA_MD5)
    folder = data_folder(tags, project_dir)
    if folder is None:
        return [Check(k, tags.get(k, "not recorded"), "?", "unverifiable", True, "the run recorded no data.dir")
                for k in items]
    manifest = folder / "manifest.parquet"
    now = {
        DATA_MANIFEST_SHA256: sha256_file(manifest) if manifest.is_file() else "missing",
        DATA_MD5: tracking.dvc_dir_md5(folder) if folder.is_dir() else f"missing ({folder} does not exist)",
    }
    checks = []
    for k in items:
        rec = tags.get(k)
        if not rec:
            checks.append(Check(k, "not recorded", now[k], "unverifiable", True, "the run recorded no such hash"))
            continue
        same = rec == now[k]
        checks.append(Check(k, rec, now[k], "same" if same else "differs", True,
                            "" if same else f"the data in {folder} changed since the run"))
    return checks


def refusal_message(run_id: str, blocking: list[Check], tags: dict[str, str]) -> str:
    lines = [f"run {run_id} cannot be reproduced faithfully from this checkout; nothing was trained:"]
    lines += [c.line() for c in blocking]
    fixes = []
    recorded = tags.get(GIT_SHA, "")
    sha = recorded.removesuffix("-dirty")
    git = next((c for c in blocking if c.item == GIT_SHA), None)
    if git is not None and git.now.removesuffix("-dirty") == sha and git.status == "differs":
        fixes.append("commit or stash this checkout's uncommitted changes (" + git.note.split(" to ", 1)[-1].split(
            ";")[0] + ")")
    elif git is not None and len(sha) == 40 and git.now.removesuffix("-dirty") != sha:
        fixes.append(f"check out the recorded commit (`git switch --detach {sha}`)" + (
            "; the run's uncommitted changes on top of it are recorded nowhere, so only you can tell whether this "
            "checkout has them (train from committed code to make runs verifiable)" if recorded.endswith("-dirty")
            else ""))
    elif git is not None and git.now.removesuffix("-dirty") == sha:
        fixes.append("this is the run's commit, but its uncommitted changes are recorded nowhere (" +
                     (tags.get(GIT_DIRTY) or "files unknown") + "): only you can tell whether this checkout has "
                     "them; if so add --force (train from committed code to make runs verifiable)")
    if any(c.item.startswith("data.") for c in blocking):
        fixes.append(f"restore the recorded data in {tags.get(DATA_DIR)} (`dvc checkout` or `dvc pull` at that "
                     f"commit, or `dvc repro` of its stage)")
    if any(c.item.startswith(VERSION) for c in blocking):
        fixes.append("install the recorded versions (`make setup` at that commit)")
    fixes.append("or add --force to train anyway and compare the numbers")
    return "\n".join(lines) + "\nTo reproduce it: " + "; ".join(fixes)


# ------------------------------------------------------------------------------------------- comparison
def final_metrics(tracking_uri: str, run_id: str, later: list[str] | None = None) -> dict[str, tuple[int, float]]:
    """Every metric the run's training logged but timings, as (last step, the value logged last at that step). A
    finished run's points logged after it ended (`sqgan eval`, `sqgan sample --cluster` add theirs to the run) are
    not the training's: their keys go to `later` instead."""
    client = tracking.mlflow_client(tracking_uri)
    run = client.get_run(run_id)
    end = run.info.end_time if run.info.status != "RUNNING" else None
    keys = [k for k in run.data.metrics if not is_timing(k)]
    out = {}
    for key in keys:
        during = [m for m in client.get_metric_history(run_id, key) if end is None or m.timestamp <= end]
        if not during:
            if later is not None:
                later.append(key)
            continue
        last = max(during, key=lambda m: (m.step, m.timestamp))
        out[key] = (int(last.step), float(last.value))
    return out


def compare(recorded: dict[str, tuple[int, float]], new: dict[str, tuple[int, float]],
            later: list[str] | None = None) -> Comparison:
    rows = []
    for key in sorted(set(recorded) | set(new)):
        rs, rv = recorded.get(key, (None, None))
        ns, nv = new.get(key, (None, None))
        rows.append(MetricRow(key, rs, rv, ns, nv))
    return Comparison(rows, sorted(set(later or [])))


# ------------------------------------------------------------------------------------------- the stage
def default_out(run_id: str) -> Path:
    return Path("runs") / f"reproduce-{run_id[:8]}"


def reproduce(
    run_id: str,
    out: str | Path | None = None,
    *,
    force: bool = False,
    tracking_uri: str | None = None,
    project_dir: str | Path = ".",
    say: Callable[[str], None] = lambda _: None,
) -> Reproduction:
    """Check, train again, compare (see the module doc). Raises ReproduceRefused (nothing trained) when a counted
    provenance item differs and not `force`; returns the comparison whether or not the numbers are equal."""
    t0 = time.perf_counter()
    uri = tracking_uri or default_tracking_uri(project_dir)
    old = read_run(run_id, uri)
    out_dir = Path(out) if out is not None else Path(project_dir) / default_out(run_id)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"--out {out_dir} exists; a reproduction trains into a new folder and never over an "
                              f"earlier one: pass e.g. --out {free_sibling(out_dir)}")
    checks = verify_provenance(old.tags, project_dir)
    say(f"run {run_id} ({old.experiment}, params from its {old.params_source}) against this checkout:")
    for c in checks:
        say(c.line())
    blocking = [c for c in checks if c.counts and c.status != "same"]
    if blocking and not force:
        raise ReproduceRefused(refusal_message(run_id, blocking, old.tags))
    if blocking:
        say(f"--force: training although {', '.join(c.item for c in blocking)} differ from the record")

    # The same store and experiment as the recorded run; every other param as recorded (seed included).
    params, changed = old.params, {}
    placement = {"mlflow.tracking_uri": uri, "mlflow.experiment": old.experiment}
    if tracking.resolve_tracking_uri(params, project_dir) == uri:
        placement.pop("mlflow.tracking_uri")
    if params.mlflow.experiment == old.experiment:
        placement.pop("mlflow.experiment")
    if placement:
        flat = params.flat()
        changed = {k: [flat[k], v] for k, v in placement.items()}
        params = params.override(placement, source="reproduce")
    data_dir = data_folder(old.tags, project_dir)
    if data_dir is None:
        raise ValueError(f"run {run_id} recorded no data.dir tag: the dataset it trained on is unknown")

    say(f"training again into {out_dir} …")
    new_id = None
    try:
        new_id = ray_train.run_training(params, data_dir, out_dir, project_dir=project_dir).run_id
    finally:  # tag the new run even when its training failed (open_run recorded it in tracking.json)
        new_id = new_id or _recorded_run_id(out_dir)
        if new_id:
            tags = {REPRODUCES: run_id}
            if params.mlflow.run_name is None:
                tags[RUN_NAME] = f"reproduce-{run_id[:8]}"
            tracking.MlflowLogger(uri, new_id).set_tags(tags)

    later: list[str] = []
    comparison = compare(final_metrics(uri, run_id, later), final_metrics(uri, new_id), later)
    result = Reproduction(run_id, new_id, uri, out_dir, checks, [c.item for c in blocking], comparison,
                          time.perf_counter() - t0, changed)
    write_json_atomic(out_dir / REPORT_FILE, report_json(result))
    logger = tracking.MlflowLogger(uri, new_id)
    logger.log_artifact(out_dir / REPORT_FILE)
    logger.set_tags({REPRODUCE_EQUAL: str(comparison.equal).lower(),
                     REPRODUCE_DIFFERING: len(comparison.differing),
                     REPRODUCE_FORCED: ",".join(result.forced) or "none"})
    return result


def _recorded_run_id(out_dir: Path) -> str | None:
    try:
        return str(json.loads((out_dir / tracking.TRACKING_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def report_json(r: Reproduction) -> dict[str, Any]:
    return {
        "reproduces": r.reproduces,
        "run_id": r.run_id,
        "tracking_uri": r.tracking_uri,
        "out_dir": str(r.out_dir),
        "seconds": round(r.seconds, 1),
        "checks": [asdict(c) for c in r.checks],
        "forced": r.forced,
        "params_changed": r.params_changed,
        **r.comparison.as_json(),
    }
