"""MLflow tracking (smile_ray.orchestration.tracking) of a `train` run, on a real sqlite
store: the run holds its params, curves, test metrics, reliability diagram, model and
code version, and the model loads back from MLflow. A study's trials' models and best
model: tests/test_api.py::test_the_python_api_example_runs. The study logger draws trials'
diagrams on its own thread, off Tune's loop."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import smile_ray
from smile_ray.cli import main
from smile_ray.orchestration import tracking

ROOT = Path(__file__).resolve().parents[1]


def test_train_with_a_tracking_uri_records_the_run_and_its_model(tmp_path, cache_dir, capfd):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    code = main(["train", "--output", str(out), "--cache-dir", str(cache_dir), "--quiet", "--tracking-uri", uri,
                 "--experiment", "tracked", "steps=20", "eval_every=10", "samples_per_class=2", "threads=1"])
    stdout = capfd.readouterr().out
    assert code == 0, stdout
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert run.info.status == "FINISHED" and f"MLflow: run {run.info.run_id}" in stdout
    assert run.data.params["samples_per_class"] == "2" and run.data.params["method"] == "smile"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "history/val_acc")] == [10, 20]
    metrics = json.loads((out / "metrics.json").read_text())
    assert run.data.metrics["test_acc"] == pytest.approx(metrics["test_acc"])
    assert "label_il_test" in run.data.metrics
    # the curves are the section "history", which MLflow's run page draws before the final
    # numbers: each curve is history/<key>; each final number is one point, by its own name
    names = set(run.data.metrics)
    assert {"history/val_acc", "history/val_ece", "history/train_loss", "history/lr"} <= names
    assert all(len(client.get_metric_history(run.info.run_id, n)) == 1 for n in names if not n.startswith("history/"))
    assert run.data.metrics["val_acc"] == pytest.approx(metrics["val_acc"]) and "lr" not in names
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"reliability.png", "model"}
    tags = run.data.tags
    assert tags["kind"] == "train" and tags["smile_ray.version"] == smile_ray.__version__
    if (ROOT / ".git").exists():  # a git work tree (a worktree's .git is a file): the commit
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert tags["mlflow.source.git.commit"] == head.strip()
    loaded = smile_ray.load_model(f"runs:/{run.info.run_id}/model", tracking_uri=uri)
    x, y = loaded.split("test", cache_dir=cache_dir)
    assert (loaded.predict(x) == y).float().mean().item() == pytest.approx(metrics["test_acc"], abs=1e-9)


def test_a_bad_tracking_uri_fails_before_the_run(tmp_path, cache_dir, capfd):
    out = tmp_path / "run"
    code = main(["train", "--output", str(out), "--cache-dir", str(cache_dir), "--tracking-uri", "bogus://x"])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--tracking-uri 'bogus://x' is not usable" in err
    assert not out.exists()


def test_connect_leaves_logging_and_the_environment_as_it_found_them(tmp_path):
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    before = [lg.level for lg in loggers], dict(os.environ)
    tracking.connect(f"sqlite:///{tmp_path / 'new.db'}")  # a new store: schema set-up
    assert ([lg.level for lg in loggers], dict(os.environ)) == before


def test_code_version_outside_a_git_work_tree_is_the_version_alone(tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "pkg" / "smile_ray"
    shutil.copytree(ROOT / "smile_ray", copy, ignore=shutil.ignore_patterns("__pycache__"))
    code = "from smile_ray.orchestration.tracking import code_version; print(sorted(code_version()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "pkg")}, check=True).stdout
    assert out.strip() == "['smile_ray.version']"


def test_a_file_store_refusal_keeps_mlflows_whole_hint(tmp_path, monkeypatch):
    """MLflow 3 refuses ``file:`` stores and names its own way out at the end of a long
    message; the line used to be cut at "See htt"."""
    from smile_ray.errors import SmileError

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = f"file:{tmp_path / 'mlruns'}"
    with pytest.raises(SmileError) as e:
        tracking.connect(uri)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"--tracking-uri {uri!r} is not usable: ")
    assert "MLFLOW_ALLOW_FILE_STORE=true" in line and "https://mlflow.org/docs/" in line
    assert not (tmp_path / "mlruns").exists()


def test_study_logger_draws_diagrams_off_tunes_loop_and_waits_for_them(tmp_path, caplog, monkeypatch):
    """A trial's reliability diagram is drawn and logged on the logger's own thread (Tune's
    controller starts no trial while a callback runs); the experiment's end waits for
    every diagram, and one that cannot be drawn is a warning, not a failed study."""
    import pickle
    import threading
    from types import SimpleNamespace

    from smile_ray.orchestration import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.connect(uri)
    exp = tracking.experiment_id(client, "drawing", uri)
    parent = client.create_run(exp).info.run_id
    from smile_ray.orchestration.spaces import Resources
    from smile_ray.orchestration.trainable import TrialSetup

    setup = TrialSetup(Resources(), base={"method": "smile", "dataset": "digits"})
    logger = tracking.StudyLogger(uri, exp, parent, "study", setup)
    bins = {"bins": 2, "count": [3, 1], "accuracy": [0.5, 1.0], "confidence": [0.4, 0.9]}
    good, bad = SimpleNamespace(trial_id="good", config={}), SimpleNamespace(trial_id="bad", config={})
    drawn_on, draw = [], tracking.StudyLogger._draw

    def recording(self, *args):
        drawn_on.append(threading.current_thread())
        return draw(self, *args)
    monkeypatch.setattr(tracking.StudyLogger, "_draw", recording)
    logger.on_trial_result(0, [], good, {"step": 1, "val_acc": 0.5, "reliability": json.dumps(bins)})
    logger.on_trial_result(0, [], bad, {"step": 1, "reliability": json.dumps({"bins": 2})})
    pickle.loads(pickle.dumps(logger))  # Tune snapshots its callbacks while diagrams are drawn
    with caplog.at_level("WARNING"):
        logger.on_experiment_end([])
    assert drawn_on and all(t is not threading.main_thread() for t in drawn_on)
    assert {a.path for a in client.list_artifacts(logger.runs["good"])} == {"reliability.png"}
    assert client.list_artifacts(logger.runs["bad"]) == []
    assert "no reliability diagram for trial bad" in caplog.text
    assert client.get_metric_history(logger.runs["good"], "history/val_acc")[0].value == 0.5
