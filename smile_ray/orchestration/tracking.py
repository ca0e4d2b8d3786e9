"""MLflow tracking for studies (orchestration layer): one parent run per study, one
nested child run per trial, all written from the Ray driver through ``MlflowClient``.

Logging from the driver, not from trials, sidesteps two Ray pitfalls: trainables do not
inherit the tracking URI (ray-project/ray#36257), and Ray's ``MLflowLoggerCallback``
makes top-level runs with no parent. Nesting uses MLflow's ``mlflow.parentRunId`` tag.
Any run that ends in error is marked FAILED, never left RUNNING. A trial's final report
carries its test split's reliability bins; the driver draws the reliability diagram and
logs it as the child run's artifact ``reliability.png``, on a thread of its own: Tune's
controller starts no trial while a callback runs, and a diagram is about half a second
of matplotlib.

Models: every finished trial's ``model.pt`` and ``metrics.json`` are logged, on the same
thread, as its child run's artifact folder ``model/`` (a replicated trial's replicate 0,
which is ``train`` on the trial's config); a study's parent run gets its best trial's as
``best_model/`` and the tag ``best_model_uri``. A ``train --tracking-uri`` run is one
top-level run (:func:`log_train_run`) with the same folder. Load either with
``smile_ray.load_model("runs:/<run id>/model", tracking_uri=...)``: the files are the
run's own, not an ``mlflow.pytorch`` flavour, because the network's class and its input
transform are rebuilt from ``metrics.json`` by :func:`smile_ray.api.load_model`.

Every run carries the code that made it: MLflow's ``mlflow.source.git.commit`` tag when
the package sits in a git work tree (``smile_ray.git_dirty`` says whether tracked files
had changes), and ``smile_ray.version``.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray import tune

from smile_ray.errors import SmileError
from smile_ray.metrics import EVAL_METRICS, FINAL_METRICS, REPLICATE_KEY

if TYPE_CHECKING:
    from smile_ray.orchestration.trainable import TrialSetup

PARENT_TAG = "mlflow.parentRunId"
#: the chart section of a run's curves: every evaluation's ``val_acc``, ``val_ece``,
#: ``train_loss`` and ``lr`` at its step, as ``history/val_acc`` (``history`` is
#: metrics.json's name for them). MLflow's run page draws its named sections before the
#: unnamed "Model metrics", so the curves come first; the final numbers (``val_acc``,
#: ``test_acc``, the interpolation losses ..., one value each) keep their plain names,
#: which ``search_runs`` filters and the runs table use, and follow them.
HISTORY = "history"
#: what is a curve (``lr`` beside the evaluation metrics) and what a final number
CURVE_KEYS = ("lr", *EVAL_METRICS)


def metric_name(key: str, final: bool) -> str | None:
    """The MLflow name of a reported ``key`` (or of its replicate spread / per-seed
    value, ``val_acc_std``, ``val_acc_r0``): ``history/<key>`` for a curve's point,
    ``key`` for a final number; None for what is not logged (``step``, bookkeeping)."""
    m = REPLICATE_KEY.fullmatch(key)
    base = key if key in CURVE_KEYS or key in FINAL_METRICS or m is None else m[1]
    if final:
        return key if base in FINAL_METRICS else None
    return f"{HISTORY}/{key}" if base in CURVE_KEYS else None


def default_tracking_uri() -> str:
    """MLflow 3's own default store, ``sqlite:///mlflow.db`` in the working directory, as
    an absolute path so that every process writes to the same file whatever its cwd."""
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


@contextmanager
def _mlflow_environ(**values: str) -> Iterator[None]:
    """MLflow's settings that it reads from the environment, set for the block only: the
    caller's environment is as it was afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fail_fast():
    """A check of the store that fails at once rather than retrying for minutes."""
    return _mlflow_environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")


def connect(tracking_uri: str | None) -> MlflowClient:
    """A client for ``tracking_uri`` (default: :func:`default_tracking_uri`), checked with
    one cheap request so that a bad URI fails before anything is created."""
    uri = tracking_uri or default_tracking_uri()
    try:
        with _fail_fast(), _quiet_loggers("mlflow", "alembic"):  # a new sqlite store's schema set-up chatter
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as e:  # mlflow raises many types for bad URIs and dead servers
        raise SmileError(f"--tracking-uri {uri!r} is not usable: {_cause(e)}") from None
    return client


@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Those loggers at WARNING for the block, then as they were: the library leaves the
    process's logging configuration as it found it."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)


def _cause(e: BaseException) -> str:
    """The innermost reason of a (chained) exception, on one line: for a dead server,
    "Connection refused" rather than MLflow's retry wrapper around it. Otherwise the
    whole first message, not cut short: MLflow's own fix is often at its end (for a
    ``file:`` store, "set `MLFLOW_ALLOW_FILE_STORE=true`")."""
    chain = [e]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt in chain:
            break
        chain.append(nxt)
    text = " ".join(str(x) for x in chain)
    for known in ("Connection refused", "Name or service not known", "timed out", "No route to host"):
        if known in text:
            return known
    first = next((str(x).strip().splitlines()[0] for x in chain if str(x).strip()), e.__class__.__name__)
    return re.sub(r"\s+", " ", first)


#: MLflow 3's UI opens an experiment by its kind: without this tag it guesses, and shows a
#: new experiment as a GenAI one (an empty "Overview/Traces" page); this kind opens the
#: runs table, the view for model training (the UI's ExperimentKind enum)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


# MLflow 3's UI opens every experiment on its GenAI pages (traces) unless the page's
# address asks for the model-training view; the experiment-kind tag alone does not do it.
UI_VIEW = "?workflowType=machine_learning"


def ui_link(uri: str, experiment_id: str, run_id: str) -> str:
    """Where a person sees a parent run, its child runs, their curves and artifacts."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}{UI_VIEW}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"run `mlflow ui --backend-store-uri {uri}`, then open http://127.0.0.1:5000/{page}"


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, made if needed, tagged as a model-training experiment."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND_TAG not in found.tags:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database, by absolute path (MLflow's default is ./mlruns
        # relative to whichever process happens to log).
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()  # a relative URI too
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def flat_params(values: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)) for k, v in sorted(values.items())]


MODEL_DIR = "model"  # a run's artifact folder holding model.pt and metrics.json
MODEL_FILES = ("model.pt", "metrics.json")


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """Tags naming the code that runs: the git commit of the package's work tree (under
    MLflow's own tag name, which its UI shows) and whether tracked files had changes;
    only the version where the package is not in a git work tree (an installed wheel)."""
    from smile_ray import __version__

    tags = {"smile_ray.version": __version__}
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0 and (root / ".git").exists():
            tags["mlflow.source.git.commit"] = head.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            tags["smile_ray.git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass  # no git: the version alone
    return tags


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def run_metrics(metrics: dict[str, Any]) -> list[Metric]:
    """A run's curves (every evaluation of ``history``, at its step, as ``history/<key>``)
    and its final numbers (at the last step), from a metrics.json (:data:`HISTORY`)."""
    ts, last = 0, int(metrics.get("steps", 0))
    out = [Metric(name, float(v), ts, int(h["step"])) for h in metrics.get("history", []) for k, v in h.items()
           if _number(v) and (name := metric_name(k, final=False))]
    return out + [Metric(name, float(v), ts, last) for k, v in metrics.items()
                  if _number(v) and (name := metric_name(k, final=True))]


def log_model_files(client: MlflowClient, run_id: str, folder: Path, artifact_path: str = MODEL_DIR) -> bool:
    """Log ``folder``'s model.pt and metrics.json as the run's ``artifact_path``; False
    when the folder holds no model."""
    if not (folder / "model.pt").is_file():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODEL_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, Path(tmp) / name)
        client.log_artifacts(run_id, tmp, artifact_path)
    return True


def log_train_run(client: MlflowClient, uri: str, experiment: str | None, out: Path, metrics: dict[str, Any]) -> str:
    """Record a finished ``train`` run as one MLflow run: the full config as params, the
    curves and final metrics, the code version, ``reliability.png``, ``metrics.json``
    and the model (``model/``). Returns the run's id; a failure while logging marks the
    run FAILED and is one line."""
    config = metrics["config"]
    exp_id = experiment_id(client, experiment or f"smile-ray-{config['dataset']}", uri)
    run = client.create_run(exp_id, run_name=Path(out).name, tags={
        "kind": "train", "method": str(config["method"]), "dataset": str(config["dataset"]), **code_version()})
    run_id = run.info.run_id
    try:
        client.log_batch(run_id, params=flat_params(config))
        batch = run_metrics(metrics)
        for i in range(0, len(batch), 1000):  # MLflow's limit per batch
            client.log_batch(run_id, metrics=batch[i:i + 1000])
        if (Path(out) / "reliability.png").is_file():
            client.log_artifact(run_id, str(Path(out) / "reliability.png"))
        log_model_files(client, run_id, Path(out))
    except Exception as e:
        client.set_terminated(run_id, status="FAILED")
        raise SmileError(f"--tracking-uri {uri!r}: logging the run failed: {_cause(e)}") from None
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def trial_run_folder(trial, tmp: Path) -> Path | None:
    """A local copy of a finished trial's run folder's model files (``run/``, or
    ``run/replicate-0`` for a replicated trial), read from the study's storage (a local
    folder or a URI) through the trial's own filesystem; None where it has no model."""
    import pyarrow.fs

    from smile_ray.orchestration.trainable import RUN_DIR

    storage = getattr(trial, "storage", None)
    if storage is None:
        return None
    fs, base = storage.storage_filesystem, f"{storage.trial_fs_path.rstrip('/')}/{RUN_DIR}"
    for folder in (base, f"{base}/replicate-0"):
        if fs.get_file_info(f"{folder}/model.pt").type != pyarrow.fs.FileType.File:
            continue
        for name in MODEL_FILES:
            if fs.get_file_info(f"{folder}/{name}").type == pyarrow.fs.FileType.File:
                with fs.open_input_stream(f"{folder}/{name}") as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        return tmp
    return None


class StudyLogger(tune.Callback):
    """Ray Tune callback: a child run per trial under ``parent_run_id``.

    Params are the trial's full config (flat config names); every evaluation's report is
    logged as the curves' points (``history/<key>``, at its ``step``), the final report
    (the one with ``test_acc``) as the final numbers (:data:`HISTORY`)."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, study_name: str, setup: TrialSetup):
        # how a trial's params become its config and tags, as the trainable reads them (not
        # ``self.setup``: Tune calls a callback's setup())
        self.trial_setup = setup
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.study_name = study_name
        self.runs: dict[str, str] = {}
        self._logged: set[tuple[str, str, int]] = set()  # (trial, metric, step) already logged
        self._drawn: set[str] = set()  # trials whose reliability diagram is logged
        self._client: MlflowClient | None = None
        self._drawer: ThreadPoolExecutor | None = None  # draws and logs the diagrams
        self._drawing: list[tuple[str, str, Future]] = []  # (trial, what, its future) not yet waited for

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; a restored logger must read the
        # child runs from MLflow as they are then, not as they were at the last snapshot.
        return {**self.__dict__, "_client": None, "runs": {}, "_logged": set(), "_drawn": set(),
                "_drawer": None, "_drawing": []}

    def children(self) -> list:
        return self.client.search_runs([self.experiment], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                                       max_results=10000)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            # A resumed study finds the child runs its trials already have.
            for run in self.children():
                trial = run.data.tags.get("trial_id")
                if trial:
                    self.runs[trial] = run.info.run_id
        return self._client

    def _run_for(self, trial) -> str:
        client = self.client
        if trial.trial_id not in self.runs:
            config, extra = self.trial_setup.config_for(trial.config), self.trial_setup.tags_for(trial.config)
            run = client.create_run(
                self.experiment,
                run_name="-".join([self.study_name, *(v for k, v in extra.items() if k != "seed")]
                                  + ([f"s{extra['seed']}"] if "seed" in extra else []) + [trial.trial_id]),
                tags={PARENT_TAG: self.parent_run_id, "trial_id": trial.trial_id, "study": self.study_name,
                      "method": str(config.get("method")), "dataset": str(config.get("dataset")), **extra,
                      **code_version()},
            )
            client.log_batch(run.info.run_id, params=flat_params(config))
            self.runs[trial.trial_id] = run.info.run_id
        else:
            client.update_run(self.runs[trial.trial_id], status="RUNNING")
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        step = int(result.get("step", 0))
        ts = int(result.get("timestamp", 0)) * 1000
        # Each evaluation's report is a point of the curves; the final report (it adds the
        # test metrics) repeats the last evaluation's and gives the final numbers. Each
        # point is logged once. A replicated trial's report adds each key's spread and
        # per-seed values.
        values = {name: float(v) for final in {False, "test_acc" in result} for k, v in result.items()
                  if _number(v) and (name := metric_name(k, final)) and (trial.trial_id, name, step) not in self._logged}
        self._logged.update((trial.trial_id, name, step) for name in values)
        metrics = [Metric(name, v, ts, step) for name, v in values.items()]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        if isinstance(result.get("reliability"), str) and trial.trial_id not in self._drawn:
            self._drawn.add(trial.trial_id)
            self._log_reliability(run_id, trial, json.loads(result["reliability"]))

    def _submit(self, trial_id: str, what: str, fn, *args) -> None:
        if self._drawer is None:
            self._drawer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smile-ray-reliability")
        self._drawing.append((trial_id, what, self._drawer.submit(fn, *args)))

    def _log_reliability(self, run_id: str, trial, reliability: dict[str, Any]) -> None:
        config = self.trial_setup.config_for(trial.config)
        self._submit(trial.trial_id, "reliability diagram", self._draw, run_id, config, reliability)

    def _log_model(self, run_id: str, trial) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = trial_run_folder(trial, Path(tmp))
            if folder is not None:
                log_model_files(self.client, run_id, folder)

    def log_best_model(self, trial_id: str) -> str | None:
        """Give the parent run the best trial's model: its files as ``best_model/`` and
        the tag ``best_model_uri`` (``runs:/<child>/model``). After :meth:`drain`."""
        child = self.runs.get(trial_id) or next(
            (r.info.run_id for r in self.children() if r.data.tags.get("trial_id") == trial_id), None)
        if child is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                # a copy between two runs of the study, not a download the user asked
                # for: without MLflow's progress bar under the study's table
                with _mlflow_environ(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
                    folder = self.client.download_artifacts(child, MODEL_DIR, tmp)
            except Exception:  # the trial logged no model (an older study resumed)
                return None
            self.client.log_artifacts(self.parent_run_id, folder, "best_model")
        uri = f"runs:/{child}/{MODEL_DIR}"
        self.client.set_tag(self.parent_run_id, "best_model_uri", uri)
        return uri

    def _draw(self, run_id: str, config: dict[str, Any], reliability: dict[str, Any]) -> None:
        from smile_ray.reports.plots import plot_run_reliability

        with tempfile.TemporaryDirectory() as tmp:
            path = plot_run_reliability({"reliability": reliability, "config": config}, Path(tmp) / "reliability.png")
            self.client.log_artifact(run_id, str(path))

    def drain(self) -> None:
        """Wait until every reliability diagram and model handed to the drawing thread is
        logged (at the experiment's end, before the study's own plots and its final
        state). One that fails to draw or log must not stop the study: it is a warning."""
        drawing, self._drawing = self._drawing, []
        for trial_id, what, future in drawing:
            try:
                future.result()
            except Exception as e:
                logging.getLogger(__name__).warning("no %s for trial %s: %s", what, trial_id, e)
        if self._drawer is not None:
            self._drawer.shutdown()
            self._drawer = None

    def on_experiment_end(self, trials, **info):
        self.drain()

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        self.client.set_terminated(run_id, status="FINISHED")
        self._submit(trial.trial_id, "model", self._log_model, run_id, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.client.set_terminated(self._run_for(trial), status="FAILED")

    def close_open_runs(self, status: str) -> None:
        """Mark the child runs of trials that never finished (interrupt, driver error),
        whichever logger instance made them."""
        self.drain()
        for run in self.children():
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status=status)
