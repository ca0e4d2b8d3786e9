"""One trial (:mod:`smile_ray.orchestration.trainable`), run by a real Tune study on
the session's one local Ray: a trial on two Ray Train workers reports every evaluation
(the suite's one Tune trial on Ray Train workers: a worker group costs about 12 s here),
replicates report the mean of their seeds, a trial trains on the device Ray gave it, and
a trial's own error ends the study in one line."""
import json
import statistics

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from smile_ray.errors import SmileError
from smile_ray.orchestration.tune import run_study
from study_files import write_space


def children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_trials_with_two_workers_report_every_evaluation(ray_local, tmp_path, mlflow_db, cache_dir, monkeypatch):
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
    assert sorted(h.step for h in client.get_metric_history(kid.info.run_id, "history/val_acc")) == [10, 20]


def test_replicated_trials_report_the_mean_of_their_seeds(ray_local, tmp_path, mlflow_db, cache_dir, monkeypatch):
    """replicates: 3 -> each trial runs seeds s, s+1, s+2 (s = base seed) as separate
    processes; Tune, the table and MLflow see their mean at every evaluation, the per-seed
    values are kept, and best.json's config (seed s) is replicate 0. The trials ask for no
    GPU: each seed records the device it resolved, the CPU, whatever the machine has."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "study"
    space = write_space(tmp_path / "space.yaml", replicates=3, num_samples=1, search="random",
                        resources={"cpus": 1, "gpus": 0}, space={"mixup_alpha": {"loguniform": [0.05, 2.0]}})
    run_study(space, out, cache_dir=cache_dir, verbose=0)
    s0 = 2022  # the config's default seed: SPACE's base does not set one
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 1 and all(r["status"] == "TERMINATED" for r in rows)
    for r in rows:
        per_seed = [r[f"val_acc_r{i}"] for i in range(3)]
        assert r["val_acc"] == pytest.approx(sum(per_seed) / 3)
        assert r["val_acc_std"] == pytest.approx(statistics.stdev(per_seed))
        assert r["test_acc"] == pytest.approx(sum(r[f"test_acc_r{i}"] for i in range(3)) / 3)
        trial_dir = next((out / "tune").glob(f"*{r['trial_id']}*"))
        seeds = [json.loads((trial_dir / "run" / f"replicate-{i}" / "metrics.json").read_text())
                 for i in range(3)]
        assert [m["config"]["seed"] for m in seeds] == [s0, s0 + 1, s0 + 2]
        assert [m["device"] for m in seeds] == ["cpu"] * 3
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
        history = client.get_metric_history(kid.info.run_id, "history/val_acc")
        assert sorted(m.step for m in history) == [10, 20]  # one mean per evaluation, not one per seed
        assert {"val_acc_std", "val_acc_r2", "test_acc_r0"} <= set(kid.data.metrics)

    # the report says the trials are means over seeds and gives their spread, not a column per seed
    from smile_ray.reports.report import build_report
    md = build_report([out], tmp_path / "report.md").read_text()
    assert f"Each trial ran 3 seeds ({s0}, {s0 + 1}, {s0 + 2})" in md
    header = next(ln for ln in md.splitlines() if ln.startswith("| trial |"))
    assert "mixup_alpha" in header and "_r0" not in header and "_std" not in header
    assert sum(" ± " in ln for ln in md.splitlines() if ln.startswith("| ") and "TERMINATED" in ln) == 1

    # replicate 0 of the winner is `train --config best.json`, in this process
    from smile_ray.config import make_config
    from smile_ray.recipe import train
    again = train(make_config(best["config"]), tmp_path / "again", cache_dir=cache_dir, progress=False)
    assert again["val_acc"] == pytest.approx(best["replicates"]["val_acc"]["per_seed"][0], abs=1.5 / 179)


def test_a_study_whose_trials_all_fail_ends_on_their_own_one_line_error(tmp_path, mlflow_db, cache_dir, ray_local):
    """What a study prints when a trial's own error is a user's (a GPU where CUDA does not
    work, here a divergence, which a CPU can produce): that line, not only a folder."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "base": {"method": "l2", "steps": 10, "eval_every": 10, "samples_per_class": 3, "lr": 1.0e6},
        "num_samples": 1, "search": "random", "space": {"lr": {"choice": [1.0e6]}},
    }))
    with pytest.raises(SmileError) as e:
        run_study(space, tmp_path / "study", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", cache_dir=cache_dir,
                  verbose=0)
    text = str(e.value)
    assert text.startswith(f"no trial of {tmp_path / 'study'} finished: training diverged at step 10"), text
    assert "\n" not in text
