"""``smile-ray tune``: a real Ray Tune + HyperOpt study, tracked in a real MLflow store."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import FEW_IL_PAIRS, assert_as_uninterrupted, interrupt_after_rows
from smile_ray.cli import main
from smile_ray.errors import SmileError
from smile_ray.orchestration.tune import run_study
from study_files import SPACE, write_space

def children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def check_study(out, client, num_trials):
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == num_trials
    assert {"trial_id", "mixup_alpha", "feature_weight", "label_mixup", "val_acc", "test_acc", "test_ece",
            "steps", "seconds", "status"} <= set(rows[0])
    assert all(r["status"] == "TERMINATED" and r["steps"] == 20 for r in rows)
    best = json.loads((out / "best.json").read_text())
    assert best["val_acc"] == max(r["val_acc"] for r in rows)
    # what the report reads: the searched keys as recorded, not guessed from the columns
    assert set(best["study"]["searched"]) == {"mixup_alpha", "feature_weight", "label_mixup"}
    winner = next(r for r in rows if r["trial_id"] == best["trial_id"])
    assert best["config"]["mixup_alpha"] == winner["mixup_alpha"] and best["test_acc"] == winner["test_acc"]
    assert (out / "val_acc_vs_params.png").stat().st_size > 1000
    # each trial's run directory is its own (trial processes are reused: one that wrote
    # into its first trial's directory would leave the others empty)
    for r in rows:
        (run,) = (out / "tune").glob(f"*{r['trial_id']}*/run/metrics.json")
        assert json.loads(run.read_text())["config"]["mixup_alpha"] == r["mixup_alpha"]

    parent_id = json.loads((out / "study.json").read_text())["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    # the UI opens the experiment on its runs, as a model-training experiment
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.metrics["best_val_acc"] == pytest.approx(best["val_acc"])
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"trials.parquet", "best.json", "val_acc_vs_params.png"} <= artifacts
    kids = children(client, parent_id)
    assert len(kids) == num_trials
    for kid in kids:
        assert kid.info.status == "FINISHED"
        assert kid.data.tags["method"] == "smile" and kid.data.tags["dataset"] == "digits"
        assert kid.data.params["steps"] == "20" and "mixup_alpha" in kid.data.params
        history = client.get_metric_history(kid.info.run_id, "history/val_acc")
        assert sorted(m.step for m in history) == [10, 20]
        assert "test_acc" in kid.data.metrics
    return rows, best


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tiny_study_through_a_real_mlflow_server_and_its_best_is_reproducible(ray_local, tmp_path, cache_dir):
    """A 2-trial study tracked by a real ``mlflow server``; the best config trains again
    to the same result through ``train --config best.json``. (The default store,
    ./mlflow.db, is every other study test's.)"""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        # readiness by the server's /health, polled: MLflow's client retries a refused
        # connection with exponential back-off, which alone cost about 5 s here
        import urllib.request

        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=5).close()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.25)
        client = MlflowClient(uri)
        out = tmp_path / "study"
        run_study(write_space(tmp_path / "space.yaml", num_samples=2), out, tracking_uri=uri, experiment="served",
                  cache_dir=cache_dir, verbose=0)
        rows, best = check_study(out, client, 2)
        served = client.get_experiment_by_name("served")
        assert served is not None
        # the address printed at the end opens the parent run in the model-training view
        state = json.loads((out / "study.json").read_text())
        assert state["mlflow_ui"] == (f"{uri}/#/experiments/{served.experiment_id}/runs/{state['parent_run_id']}"
                                      "?workflowType=machine_learning")
        with urllib.request.urlopen(uri + "/", timeout=30) as page:  # the UI itself is served there
            assert page.status == 200 and b"<html" in page.read().lower()
        assert not (tmp_path / "mlflow.db").exists()
    except BaseException:
        server.terminate()
        server.wait(timeout=30)
        raise
    server.terminate()  # it stops while the best config trains again

    try:
        # The best config trains to the same validation accuracy, here in this process (a
        # trial ran in another, on one thread: summation order may differ in the last
        # bits, not in a prediction more than once in a while, nor in the losses beyond
        # rounding).
        code = main(["train", "--config", str(out / "best.json"), "--output", str(tmp_path / "again"),
                     "--cache-dir", str(cache_dir), "--quiet"])
        assert code == 0
        again = json.loads((tmp_path / "again" / "metrics.json").read_text())
        trial = next((out / "tune").glob(f"*{best['trial_id']}*/run/metrics.json"))
        first = json.loads(trial.read_text())
        assert abs(again["val_acc"] - best["val_acc"]) <= 1.5 / again["split_sizes"]["val"]
        assert [h["train_loss"] for h in again["history"]] == pytest.approx([h["train_loss"] for h in first["history"]],
                                                                             rel=1e-4)
    finally:
        server.wait(timeout=30)


def run_cli(capfd, *argv):
    code = main(list(argv))
    return code, capfd.readouterr().err


def test_bad_command_lines(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path / "space.yaml")
    malformed = tmp_path / "bad.yaml"
    malformed.write_text("space: {mixup_alpha: [\n")
    for argv, expect in [
        (["--space", str(malformed)], "malformed YAML"),
        (["--space", str(tmp_path / "missing.yaml")], "no such file"),
        (["--space", str(space), "--num-samples", "0"], "--num-samples=0 must be an integer >= 1"),
        (["--space", str(space), "--tracking-uri", "http://127.0.0.1:9"], "--tracking-uri 'http://127.0.0.1:9' is not usable"),
        (["--space", str(space), "--tracking-uri", "bogus://x"], "is not usable"),
        (["--space", str(space), "--address", "127.0.0.1:9"], "cannot reach a Ray cluster"),
        (["--space", str(space), "--set", "mixup_alpha=-1"], "mixup_alpha=-1.0 is out of range"),
        (["--space", str(space), "--resume"], "--resume needs --output"),
        (["--resume", "--output", str(tmp_path / "none")], "holds no study to resume"),
        (["--space", str(space), "--resume", "--output", str(tmp_path / "none")], "holds no study to resume"),
        (["--resume", "--output", str(tmp_path / "none"), "--num-samples", "9"], "drop --num-samples"),
        ([], "tune needs --space FILE"),
        (["--space", str(space), "--output", "/proc/x"], "--output /proc/x: cannot write in /proc"),
    ]:
        code, err = run_cli(capfd, "tune", *argv)
        lines = err.strip().splitlines()
        assert code != 0 and len(lines) == 1 and expect in lines[0], (argv, err)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # the address check ran after the store was opened: still no experiment was made
    assert [e.name for e in client.search_experiments()] in ([], ["Default"])


def test_ctrl_c_while_the_last_trial_runs_is_an_interrupt_and_resumes_as_uninterrupted(ray_address, tmp_path,
                                                                                       mlflow_db, cache_dir,
                                                                                       monkeypatch, capfd):
    """Ctrl-C while the last of 2 trials trains, none left waiting (Tune returns its
    stopped trials as TERMINATED, so the study used to end as if complete: exit 0, a
    partial trial in the table): exit 130, one line naming --resume, the MLflow runs
    KILLED; the resume in this process does not rerun the finished trials, counts them in
    its table, prints none of Tune's or MLflow's output, and the interrupted trial ends as
    an uninterrupted one."""
    space = write_space(tmp_path / "space.yaml", num_samples=2, max_concurrent=1,
                        base={"method": "smile", "steps": 60, "eval_every": 20, "samples_per_class": 3, "threads": 1,
                              **FEW_IL_PAIRS})
    out = tmp_path / "study"
    env = {**os.environ, "SMILE_RAY_CACHE": str(cache_dir)}
    joined = ["--address", ray_address, "--cache-dir", str(cache_dir)]
    cmd = [sys.executable, "-m", "smile_ray", "tune", "--space", str(space), "--output", str(out), *joined]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    row = r"\s*\d/2\s+\d+m\d\ds\s+\w{8,}\s"
    err, finished = interrupt_after_rows(proc, row, 1, last_batch=True)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted; add --resume"), err
    assert "Traceback" not in err, err
    assert not (out / "trials.parquet").exists() and not (out / "best.json").exists()
    before = {p: p.stat().st_mtime_ns for p in finished}
    # the live table: a header once, then a row per finished trial, on an 80-120 column terminal
    (header,) = [ln.split() for ln in err.splitlines() if ln.split()[:3] == ["done", "elapsed", "trial"]]
    assert set(header[3:6]) == {"mixup_alpha", "feature_weight", "label_mixup"}, err
    assert header[6:] == ["val_acc", "best", "s/run"], err
    rows = [ln for ln in err.splitlines() if re.match(row, ln)]
    assert len(rows) == 1 and all(len(ln) <= 120 for ln in rows), err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent_id = json.loads((out / "study.json").read_text())["parent_run_id"]
    assert client.get_run(parent_id).info.status == "KILLED"
    assert sorted(k.info.status for k in children(client, parent_id)) == ["FINISHED", "KILLED"]

    # resumed in this process (a new one would only import torch and Ray again): what it
    # reads is on disk
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    code = main(["tune", "--output", str(out), "--resume", *joined])
    resumed = capfd.readouterr()
    assert code == 0, resumed.err
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["steps"] == 60 for r in rows)
    best = json.loads((out / "best.json").read_text())
    assert best["study"]["wall_seconds"] > json.loads((out / "study.json").read_text())["wall_seconds"] - 1e-6 > 0
    assert "in all" in resumed.out
    assert "Configuration for experiment" not in resumed.out and "View detailed results" not in resumed.out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in resumed.out
    assert re.search(r"^\s*2/2\s", resumed.err, re.M), resumed.err  # counted with the trials before the resume
    # after the table, nothing but our lines: no traceback, no MLflow progress bar from
    # copying the best trial's model to the study's run
    assert "Traceback" not in resumed.err and "Downloading artifacts" not in resumed.err, resumed.err
    for path, mtime in before.items():  # finished trials were not run again
        assert path.stat().st_mtime_ns == mtime
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert [k.info.status for k in children(client, parent_id)] == ["FINISHED"] * 2
    (interrupted,) = set(out.glob("tune/*/run/metrics.json")) - set(finished)
    assert_as_uninterrupted(interrupted, cache_dir, tmp_path / "direct")


def test_a_study_started_by_a_shipped_name_resumes(ray_local, tmp_path, mlflow_db, cache_dir, monkeypatch):
    """``--space smile`` names a shipped file: the study saves that file, resolved, not
    ``$PWD/smile`` (where ``--resume`` found nothing), and resumes with or without
    ``--space`` given again; another file, or the saved one changed, is refused."""
    from smile_ray import config

    shipped = tmp_path / "shipped"
    (shipped / "search_spaces").mkdir(parents=True)
    write_space(shipped / "search_spaces" / "tiny.yaml", num_samples=1, search="random")
    monkeypatch.setattr(config, "SHIPPED", shipped)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "study"
    first = run_study("tiny", out, cache_dir=cache_dir, verbose=0)
    saved = json.loads((out / "study.json").read_text())
    assert saved["space_file"] == str((shipped / "search_spaces" / "tiny.yaml").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run_study(None, out, resume=True, cache_dir=cache_dir, verbose=0)["val_acc"] == first["val_acc"]
    assert run_study("tiny", out, resume=True, cache_dir=cache_dir, verbose=0)["val_acc"] == first["val_acc"]
    with pytest.raises(SmileError, match="drop --space"):
        run_study(write_space(tmp_path / "other.yaml"), out, resume=True, cache_dir=cache_dir, verbose=0)
    (shipped / "search_spaces" / "tiny.yaml").write_text(yaml.safe_dump({**SPACE, "num_samples": 5}))
    with pytest.raises(SmileError, match="changed since the study started"):
        run_study(None, out, resume=True, cache_dir=cache_dir, verbose=0)


def test_a_trial_that_no_node_can_hold_is_refused_at_once(ray_local, tmp_path, cache_dir, monkeypatch):
    """A local Ray has no autoscaler: a trial asking more than any node has (a GPU on a
    machine without one, more CPUs than it has) would wait for ever; it is one line."""
    import ray

    monkeypatch.chdir(tmp_path)
    asks = [({"cpus": 512}, "asks for 512 CPU per process")]
    if not ray.cluster_resources().get("GPU"):
        asks.append(({"gpus": 1}, "asks for 1 CPU + 1 GPU per process"))
    for resources, expect in asks:
        space = write_space(tmp_path / "space.yaml", resources=resources)
        with pytest.raises(SmileError, match="no node of the Ray cluster has that") as e:
            run_study(space, tmp_path / "study", cache_dir=cache_dir, verbose=0)
        assert expect in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "study").exists()
