"""``smile-ray tune``: a real Ray Tune + HyperOpt study, tracked in a real MLflow store."""
import json
import os
import re
import statistics
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import assert_as_uninterrupted, interrupt_after_rows
from smile_ray.cli import main
from smile_ray.errors import SmileError
from smile_ray.orchestration.tune import run_study

TINY = {
    "base": {"method": "smile", "steps": 20, "eval_every": 10, "samples_per_class": 3},
    "num_samples": 4,
    "max_concurrent": 2,
    "space": {
        "mixup_alpha": {"loguniform": [0.05, 2.0]},
        "feature_weight": {"uniform": [0.0, 0.1]},
        "label_mixup": {"choice": [True, False]},
    },
}


def write_space(path, **changes):
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


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
        history = client.get_metric_history(kid.info.run_id, "val_acc")
        assert sorted(m.step for m in history) == [10, 20]
        assert "test_acc" in kid.data.metrics
    return rows, best


def test_tiny_study_end_to_end_and_best_is_reproducible(ray_local, tmp_path, cache_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default store is ./mlflow.db
    out = tmp_path / "study"
    run_study(write_space(tmp_path / "space.yaml"), out, cache_dir=cache_dir, verbose=0)
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    rows, best = check_study(out, client, 4)

    # The best config trains to the same validation accuracy (trials ran on one thread).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "smile_ray", "train", "--config", str(out / "best.json"), "--output",
         str(tmp_path / "again"), "--cache-dir", str(cache_dir), "--quiet"],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    # Another process: summation order may differ in the last bits, not in a prediction
    # more than once in a while, nor in the losses beyond rounding.
    trial = next((out / "tune").glob(f"*{best['trial_id']}*/run/metrics.json"))
    first = json.loads(trial.read_text())
    assert abs(again["val_acc"] - best["val_acc"]) <= 1.5 / again["split_sizes"]["val"]
    assert [h["train_loss"] for h in again["history"]] == pytest.approx([h["train_loss"] for h in first["history"]],
                                                                         rel=1e-4)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_against_a_real_mlflow_server(ray_local, tmp_path, cache_dir):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        client = MlflowClient(uri)
        deadline = time.time() + 90
        while True:
            try:
                client.search_experiments(max_results=1)
                break
            except Exception:
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(1)
        out = tmp_path / "study"
        run_study(write_space(tmp_path / "space.yaml"), out, tracking_uri=uri, experiment="served",
                  cache_dir=cache_dir, verbose=0)
        check_study(out, client, 4)
        served = client.get_experiment_by_name("served")
        assert served is not None
        # the address printed at the end opens the parent run in the model-training view
        state = json.loads((out / "study.json").read_text())
        assert state["mlflow_ui"] == (f"{uri}/#/experiments/{served.experiment_id}/runs/{state['parent_run_id']}"
                                      "?workflowType=machine_learning")
        import urllib.request

        with urllib.request.urlopen(uri + "/", timeout=30) as page:  # the UI itself is served there
            assert page.status == 200 and b"<html" in page.read().lower()
        assert not (tmp_path / "mlflow.db").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_cli(capfd, *argv):
    code = main(list(argv))
    return code, capfd.readouterr().err


@pytest.mark.parametrize(
    "changes, expect",
    [
        ({"space": {"mixup_alpha": {"normal": [0, 1]}}}, "unknown distribution 'normal'"),
        ({"space": {"mixup_alpha": {"uniform": [2.0, 0.5]}}}, "low 2.0 must be below high 0.5"),
        ({"space": {"mixup_alpha": {"loguniform": [0.0, 1.0]}}}, "loguniform: low 0.0 must be > 0"),
        ({"space": {"alpha": {"uniform": [0.1, 1.0]}}}, "'alpha' is not a config key"),
        ({"space": {"ema_decay": {"uniform": [0.5, 1.5]}}}, "ema_decay=1.5 is out of range"),
        ({"metric": "val_f1"}, "metric 'val_f1' is not reported by the trainer"),
        ({"metric": "test_acc"}, "validation metrics only"),
        ({"num_samples": 0}, "num_samples=0 must be an integer >= 1"),
        ({"search": "bayes"}, "search 'bayes'"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"space": {"mixup_alpha": {"grid": [0.1, 0.2]}}}, "grid values need search: grid or random"),
        ({"replicates": 0}, "replicates=0 must be an integer >= 1"),
        ({"replicates": 2, "resources": {"workers": 2}}, "replicates=2 with resources.workers=2"),
        ({"replicates": 2, "space": {"seed": {"randint": [0, 9]}}}, "space.seed with replicates=2"),
    ],
)
def test_bad_space_files_are_one_line_and_create_nothing(tmp_path, capfd, monkeypatch, changes, expect):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path / "space.yaml", **changes)
    code, err = run_cli(capfd, "tune", "--space", str(space), "--output", str(tmp_path / "s"))
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and expect in lines[0], err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "s").exists()


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


def test_interrupted_study_resumes_without_rerunning_finished_trials(tmp_path, cache_dir):
    space = write_space(tmp_path / "space.yaml", num_samples=4, max_concurrent=1,
                        base={"method": "smile", "steps": 60, "eval_every": 20, "samples_per_class": 3})
    out = tmp_path / "study"
    env = {**os.environ, "SMILE_RAY_CACHE": str(cache_dir)}
    cmd = [sys.executable, "-m", "smile_ray", "tune", "--space", str(space), "--output", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err, finished = interrupt_after_rows(proc, r"\s*\d/4\s+\d+m\d\ds\s+\w{8,}\s", 2)
    assert proc.returncode != 0 and "--resume" in err.strip().splitlines()[-1]
    assert len(finished) >= 2
    before = {p: p.stat().st_mtime_ns for p in finished}
    assert not (out / "trials.parquet").exists()
    # the live table: a header once, then a row per finished trial, on an 80-120 column terminal
    (header,) = [ln.split() for ln in err.splitlines() if ln.split()[:3] == ["done", "elapsed", "trial"]]
    assert set(header[3:6]) == {"mixup_alpha", "feature_weight", "label_mixup"}, err
    assert header[6:] == ["val_acc", "best", "s/run"], err
    rows = [ln for ln in err.splitlines() if re.match(r"\s*\d/4\s+\d+m\d\ds\s+\w{8,}\s", ln)]
    assert len(rows) >= 2 and all(len(ln) <= 120 for ln in rows), err

    resume = [sys.executable, "-m", "smile_ray", "tune", "--output", str(out), "--resume"]
    resumed = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 4 and all(r["status"] == "TERMINATED" for r in rows)
    best = json.loads((out / "best.json").read_text())
    assert best["study"]["wall_seconds"] > json.loads((out / "study.json").read_text())["wall_seconds"] - 1e-6 > 0
    assert "in all" in resumed.stdout
    assert "Configuration for experiment" not in resumed.stdout and "View detailed results" not in resumed.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in resumed.stdout
    assert re.search(r"^\s*4/4\s", resumed.stderr, re.M), resumed.stderr  # counted with the trials before the resume
    for path, mtime in before.items():  # finished trials were not run again
        assert path.stat().st_mtime_ns == mtime
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent_id = json.loads((out / "study.json").read_text())["parent_run_id"]
    kids = children(client, parent_id)
    assert len(kids) == 4 and all(k.info.status == "FINISHED" for k in kids)
    assert client.get_run(parent_id).info.status == "FINISHED"


def test_ctrl_c_while_the_last_trial_runs_is_an_interrupt_and_resumes_as_uninterrupted(tmp_path, cache_dir):
    """Ctrl-C with no trial left waiting: Tune returns its stopped trials as TERMINATED, so
    the study used to end as if complete (exit 0, a partial trial in the table)."""
    space = write_space(tmp_path / "space.yaml", num_samples=2, max_concurrent=1, search="random",
                        base={"method": "smile", "steps": 60, "eval_every": 20, "samples_per_class": 3, "threads": 1})
    out = tmp_path / "study"
    env = {**os.environ, "SMILE_RAY_CACHE": str(cache_dir)}
    cmd = [sys.executable, "-m", "smile_ray", "tune", "--space", str(space), "--output", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err, finished = interrupt_after_rows(proc, r"\s*\d/2\s+\d+m\d\ds\s+\w{8,}\s", 1, last_batch=True)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted; add --resume"), err
    assert "Traceback" not in err and not (out / "trials.parquet").exists() and not (out / "best.json").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent_id = json.loads((out / "study.json").read_text())["parent_run_id"]
    assert client.get_run(parent_id).info.status == "KILLED"
    assert sorted(k.info.status for k in children(client, parent_id)) == ["FINISHED", "KILLED"]

    resume = [sys.executable, "-m", "smile_ray", "tune", "--output", str(out), "--resume"]
    resumed = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["steps"] == 60 for r in rows)
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert [k.info.status for k in children(client, parent_id)] == ["FINISHED"] * 2
    (interrupted,) = set(out.glob("tune/*/run/metrics.json")) - set(finished)
    assert_as_uninterrupted(interrupted, cache_dir, tmp_path / "direct")


def test_a_study_started_by_a_shipped_name_resumes(ray_local, tmp_path, cache_dir, monkeypatch):
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
    (shipped / "search_spaces" / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "num_samples": 5}))
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


def test_trials_with_two_workers_report_every_evaluation(ray_local, tmp_path, cache_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path / "space.yaml", num_samples=1, max_concurrent=1, search="random",
                        resources={"cpus": 2, "workers": 2},
                        space={"mixup_alpha": {"uniform": [0.1, 1.0]}})
    out = tmp_path / "study"
    run_study(space, out, cache_dir=cache_dir, verbose=0)
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "TERMINATED" and rows[0]["steps"] == 20
    trained = list((out / "tune").glob("*/run/metrics.json"))
    assert len(trained) == 1
    m = json.loads(trained[0].read_text())
    assert m["workers"] == 2 and m["ranks_consistent"] is True and m["val_acc"] == rows[0]["val_acc"]
    # Tune saw every evaluation, as for an in-process trial: ASHA can act on it, and the
    # MLflow child holds the curve
    results = [json.loads(x) for x in trained[0].parents[1].joinpath("result.json").read_text().splitlines() if x]
    assert [r["step"] for r in results if "val_acc" in r and "test_acc" not in r] == [10, 20]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent_id = json.loads((out / "study.json").read_text())["parent_run_id"]
    (kid,) = children(client, parent_id)
    assert sorted(h.step for h in client.get_metric_history(kid.info.run_id, "val_acc")) == [10, 20]


def test_replicated_trials_report_the_mean_of_their_seeds(ray_local, tmp_path, cache_dir, monkeypatch):
    """replicates: 3 -> each trial runs seeds s, s+1, s+2 (s = base seed) as separate
    processes; Tune, the table and MLflow see their mean at every evaluation, the per-seed
    values are kept, and best.json's config (seed s) is replicate 0."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "study"
    space = write_space(tmp_path / "space.yaml", replicates=3, num_samples=2, search="random",
                        space={"mixup_alpha": {"loguniform": [0.05, 2.0]}})
    run_study(space, out, cache_dir=cache_dir, verbose=0)
    s0 = 2022  # the config's default seed: TINY's base does not set one
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows)
    for r in rows:
        per_seed = [r[f"val_acc_r{i}"] for i in range(3)]
        assert r["val_acc"] == pytest.approx(sum(per_seed) / 3)
        assert r["val_acc_std"] == pytest.approx(statistics.stdev(per_seed))
        assert r["test_acc"] == pytest.approx(sum(r[f"test_acc_r{i}"] for i in range(3)) / 3)
        trial_dir = next((out / "tune").glob(f"*{r['trial_id']}*"))
        seeds = [json.loads((trial_dir / "run" / f"replicate-{i}" / "metrics.json").read_text())
                 for i in range(3)]
        assert [m["config"]["seed"] for m in seeds] == [s0, s0 + 1, s0 + 2]
        assert [m["val_acc"] for m in seeds] == pytest.approx(per_seed)
        # distinct seeds draw distinct training subsets: the curves differ
        assert len({tuple(h["train_loss"] for h in m["history"]) for m in seeds}) == 3
    best = json.loads((out / "best.json").read_text())
    assert best["replicates"]["seeds"] == [s0, s0 + 1, s0 + 2]
    assert best["replicates"]["val_acc"]["mean"] == pytest.approx(max(r["val_acc"] for r in rows))
    assert len(best["replicates"]["test_acc"]["per_seed"]) == 3 and best["config"]["seed"] == s0

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent_id = json.loads((out / "study.json").read_text())["parent_run_id"]
    for kid in children(client, parent_id):
        history = client.get_metric_history(kid.info.run_id, "val_acc")
        assert sorted(m.step for m in history) == [10, 20]  # one mean per evaluation, not one per seed
        assert {"val_acc_std", "val_acc_r2", "test_acc_r0"} <= set(kid.data.metrics)

    # the report says the trials are means over seeds and gives their spread, not a column per seed
    from smile_ray.reports.report import build_report
    md = build_report([out], tmp_path / "report.md").read_text()
    assert f"Each trial ran 3 seeds ({s0}, {s0 + 1}, {s0 + 2})" in md
    header = next(ln for ln in md.splitlines() if ln.startswith("| trial |"))
    assert "mixup_alpha" in header and "_r0" not in header and "_std" not in header
    assert sum(" ± " in ln for ln in md.splitlines() if ln.startswith("| ") and "TERMINATED" in ln) == 2

    # replicate 0 of the winner is `train --config best.json`, in this process
    from smile_ray.config import make_config
    from smile_ray.recipe import train
    again = train(make_config(best["config"]), tmp_path / "again", cache_dir=cache_dir, progress=False)
    assert again["val_acc"] == pytest.approx(best["replicates"]["val_acc"]["per_seed"][0], abs=1.5 / 179)


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
    assert client.get_metric_history(logger.runs["good"], "val_acc")[0].value == 0.5
