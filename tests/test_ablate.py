"""``smile-ray ablate``: arms over shared seeds, paired statistics, MLflow."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from conftest import FEW_IL_PAIRS, assert_as_uninterrupted, interrupt_after_rows
from smile_ray.orchestration.ablate import run_ablation
from smile_ray.stats import paired_stats
from smile_ray.cli import main
from study_files import DEFINITIONS, write_defs

def test_tiny_ablation_end_to_end(ray_local, tmp_path, mlflow_db, cache_dir, monkeypatch):
    """Two drops over two seeds, each run on the definitions' ``resources`` (two CPUs:
    Ray gives each run both, and torch takes both threads; that a trial on Ray Train
    workers, ``resources: {workers: 2}``, reports like any other is test_trainable.py's,
    on the same path of the trials' set-up)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "abl"
    table = run_ablation(write_defs(tmp_path / "defs.yaml", resources={"cpus": 2}), out,
                         drops=["source_label", "feature_mixup+label_mixup"], cache_dir=cache_dir, verbose=0)
    runs = [json.loads(p.read_text()) for p in (out / "tune").glob("*/run/metrics.json")]
    assert len(runs) == 6 and all(m["threads"] == 2 for m in runs)  # the default, one CPU a run, gives 1
    rows = pq.read_table(out / "ablation.parquet").to_pylist()
    arms = ["full", "-source_label", "-feature_mixup+label_mixup"]
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted((a, s) for a in arms for s in (0, 1))

    configs = {(r["arm"], r["seed"]): json.loads(r["config"]) for r in rows}
    for seed in (0, 1):
        full = configs[("full", seed)]
        for arm, off in [("-source_label", {"source_label": False}),
                         ("-feature_mixup+label_mixup", {"feature_mixup": False, "label_mixup": False})]:
            other = configs[(arm, seed)]
            assert {k for k in full if full[k] != other[k]} == set(off)  # exactly the dropped overrides
            assert all(other[k] == v for k, v in off.items())
        assert full["seed"] == seed and full["samples_per_class"] == 3

    # the statistics in ablation.md are those of the parquet
    md = (out / "ablation.md").read_text()
    assert table in md
    for arm in arms[1:]:
        full_acc = [100 * r["test_acc"] for r in sorted(rows, key=lambda r: r["seed"]) if r["arm"] == "full"]
        arm_acc = [100 * r["test_acc"] for r in sorted(rows, key=lambda r: r["seed"]) if r["arm"] == arm]
        s = paired_stats(full_acc, arm_acc)
        line = next(ln for ln in md.splitlines() if f"| {arm} |" in ln)
        assert f"{np.mean(arm_acc):.2f} ± {np.std(arm_acc, ddof=1):.2f}" in line
        assert f"{s['diff']:+.2f}" in line and f"{s['p_improve']:.2f}" in line and f"{s['p_value']:.3f}" in line
    assert (out / "ablation.png").stat().st_size > 1000

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smile-ray-digits")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'ablation'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    pid = parents[0].info.run_id
    assert {"ablation.parquet", "ablation.md", "ablation.png"} <= {a.path for a in client.list_artifacts(pid)}
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{pid}'")
    assert sorted((k.data.tags["arm"], k.data.tags["seed"]) for k in kids) == sorted((a, str(s)) for a in arms for s in (0, 1))
    assert all(k.info.status == "FINISHED" and "test_acc" in k.data.metrics for k in kids)
    # the interpolation losses reach the rows and MLflow; each child has its reliability diagram
    assert all(r["label_il_test"] > 0 for r in rows) and all("label_il_test" in k.data.metrics for k in kids)
    assert all("reliability.png" in {a.path for a in client.list_artifacts(k.info.run_id)} for k in kids)
    src = next(k for k in kids if k.data.tags["arm"] == "-source_label")
    assert src.data.params["source_label"] == "False"


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--drop", "teacher"], "unknown component 'teacher' (valid: feature_mixup, source_label, mean_teacher"),
        (["--drop", "feature_mixup+source_label+mean_teacher+label_mixup+head_l2+plain_tail"], "leaves an empty method"),
        (["--drop", "source_label", "--seeds", "1"], "--seeds=1 must be an integer >= 2 (a paired test needs at least 2 seeds)"),
        ([], "nothing to ablate"),
        (["--drop", "source_label", "--set", "ema_decay=2"], "ema_decay=2.0 is out of range"),
        (["--drop", "source_label", "--set", "delta_weight=0.1"],
         "--set delta_weight: smile does not read it with this config, so it would do nothing"),
        (["--drop", "source_label", "--seeds", "many"], "--seeds='many': expected a number of seeds or auto"),
        (["--drop", "source_label", "--max-seeds", "8"], "--max-seeds only goes with --seeds auto"),
        (["--drop", "source_label", "--seeds", "auto", "--max-seeds", "1"], "--max-seeds=1 must be >= 2"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capfd, monkeypatch, argv, expect):
    monkeypatch.chdir(tmp_path)
    defs = write_defs(tmp_path / "defs.yaml")
    code = main(["ablate", "--definitions", str(defs), "--output", str(tmp_path / "o"), *argv])
    lines = capfd.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and expect in lines[0], lines
    assert not (tmp_path / "o").exists() and not (tmp_path / "mlflow.db").exists()


def test_paired_statistics_by_hand():
    full, arm = [80.0, 82.0, 84.0], [81.0, 83.0, 86.0]
    s = paired_stats(full, arm)
    assert s["diff"] == pytest.approx(4 / 3)
    # 3 pairs: the t-interval, mean +- t(0.975, 2) * sd / sqrt(3), differences 1, 1, 2
    half = 4.302652729911275 * (1 / 3) ** 0.5 / 3 ** 0.5
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((4 / 3 - half, 4 / 3 + half))
    # from 10 pairs on, the percentile bootstrap: inside the range of the differences
    ten = paired_stats([0.0] * 10, [1.0, 2.0] * 5)
    assert 1.0 <= ten["ci_low"] < 1.5 < ten["ci_high"] <= 2.0
    # P(arm > full) over all 9 pairs: 81>80; 83>80,82; 86>all three -> 6 of 9
    assert s["p_improve"] == pytest.approx(6 / 9)
    assert 0 < s["p_value"] < 0.2
    same = paired_stats(full, full)
    assert same["diff"] == 0 and same["p_value"] == 1.0 and same["p_improve"] == pytest.approx(0.5)


def test_an_interrupted_ablation_resumes_without_rerunning_finished_runs(ray_address, tmp_path, mlflow_db, cache_dir,
                                                                         monkeypatch, capfd):
    """Ctrl-C while the last run trains (no run left waiting: Tune hands back the stopped
    run as TERMINATED, which used to end in a KeyError traceback with MLflow runs left
    RUNNING): exit 130, one line naming --resume, the resumed run as an uninterrupted one."""
    import os
    import re
    import subprocess
    import sys

    defs = write_defs(tmp_path / "defs.yaml", base={"method": "smile", "steps": 60, "eval_every": 20, "threads": 1, **FEW_IL_PAIRS},
                      max_concurrent=1)
    out = tmp_path / "abl"
    env = {**os.environ, "SMILE_RAY_CACHE": str(cache_dir)}
    cmd = [sys.executable, "-m", "smile_ray", "ablate", "--definitions", str(defs), "--output", str(out),
           "--address", ray_address, "--cache-dir", str(cache_dir)]
    proc = subprocess.Popen(cmd + ["--drop", "source_label"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err, finished = interrupt_after_rows(proc, r"\s*\d/4\s", 3, last_batch=True)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("error: interrupted; add --resume"), err
    assert "Traceback" not in err and len(finished) == 3, err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent_id = json.loads((out / "ablation.json").read_text())["parent_run_id"]
    assert client.get_run(parent_id).info.status == "KILLED"
    exp_id = client.get_run(parent_id).info.experiment_id
    assert sorted(k.info.status for k in client.search_runs(
        [exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")) == ["FINISHED"] * 3 + ["KILLED"]
    # the live table names each run by its arm, data size and seed
    assert [ln.split() for ln in err.splitlines() if ln.split()[:2] == ["done", "elapsed"]] == [
        ["done", "elapsed", "arm", "samples_per_class", "seed", "val_acc", "test_acc", "s/run"]], err
    rows = [ln.split() for ln in err.splitlines() if re.match(r"\s*\d/4\s", ln)]
    assert len(rows) >= 2 and all(r[2] in ("full", "-source_label") and r[3] == "3" and r[4] in ("0", "1")
                                  for r in rows), err
    before = {p: p.stat().st_mtime_ns for p in finished}
    assert not (out / "ablation.parquet").exists()

    # refused and resumed in this process (a new one would only import torch and Ray
    # again): what they read is on disk
    monkeypatch.chdir(tmp_path)
    again = ["ablate", "--output", str(out), "--address", ray_address, "--cache-dir", str(cache_dir), "--resume"]
    capfd.readouterr()
    assert main(again + ["--seeds", "3"]) == 2 and "drop --seeds" in capfd.readouterr().err
    code = main(again)
    resumed = capfd.readouterr()
    assert code == 0, resumed.err
    assert re.search(r"^\s*4/4\s", resumed.err, re.M), resumed.err
    assert "View detailed results" not in resumed.out + resumed.err  # Tune's own output is off
    rows = pq.read_table(out / "ablation.parquet").to_pylist()
    assert sorted((r["arm"], r["seed"]) for r in rows) == [("-source_label", 0), ("-source_label", 1),
                                                           ("full", 0), ("full", 1)]
    for path, mtime in before.items():  # finished runs were not run again
        assert path.stat().st_mtime_ns == mtime
    (interrupted,) = set(out.glob("tune/*/run/metrics.json")) - set(finished)
    assert_as_uninterrupted(interrupted, cache_dir, tmp_path / "direct")
    exp = client.get_experiment_by_name("smile-ray-digits")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'ablation'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(kids) == 4 and all(k.info.status == "FINISHED" for k in kids)


def _rows(diffs_by_arm, seeds, spc=5, base=80.0):
    """Ablation rows whose arm - full differences are the given per-seed points."""
    rows = [{"arm": "full", "seed": k, "samples_per_class": spc, "test_acc": (base + k) / 100} for k in seeds]
    for arm, diffs in diffs_by_arm.items():
        rows += [{"arm": arm, "seed": k, "samples_per_class": spc, "test_acc": (base + k + d) / 100}
                 for k, d in zip(seeds, diffs)]
    return rows


def test_adaptive_seeds_add_rounds_only_to_unresolved_arms():
    from smile_ray.orchestration.ablate import next_round, resolution

    # -a: +2, +3, +2.5 points on seeds 0-2: t-interval 2.5 +- 4.303 * 0.5 / sqrt 3 = [1.26, 3.74], excludes 0;
    # -b: +1, -1, +0.5: contains 0
    rows = _rows({"-a": [2.0, 3.0, 2.5], "-b": [1.0, -1.0, 0.5]}, range(3))
    res = resolution(rows, ["full", "-a", "-b"])
    assert res[5, "-a"]["resolved"] and not res[5, "-b"]["resolved"]
    assert res[5, "-a"]["ci"] == pytest.approx([2.5 - 4.302652729911275 * 0.5 / 3 ** 0.5,
                                                2.5 + 4.302652729911275 * 0.5 / 3 ** 0.5])
    # the next round: full and -b only, three more seeds; capped at max_seeds; nothing once all are done
    assert next_round(rows, ["full", "-a", "-b"], {5: 3}, 3, 20) == {5: (["full", "-b"], range(3, 6))}
    assert next_round(rows, ["full", "-a", "-b"], {5: 3}, 3, 4) == {5: (["full", "-b"], range(3, 4))}
    assert next_round(rows, ["full", "-a", "-b"], {5: 3}, 3, 3) == {}
    assert next_round(_rows({"-a": [2.0, 3.0, 2.5]}, range(3)), ["full", "-a"], {5: 3}, 3, 20) == {}


def test_the_table_pairs_each_arm_over_the_seeds_it_shares_with_full():
    from smile_ray.reports.tables import ablation_table

    # full ran seeds 0-5; -a resolved after seeds 0-2 and stopped, -b ran all six
    rows = _rows({"-b": [1.0, -1.0, 0.5, 0.0, 1.0, -0.5]}, range(6)) + _rows({"-a": [2.0, 3.0, 2.5]}, range(3))[3:]
    table = ablation_table(rows, ["full", "-a", "-b"], "full")
    line = {r.split("|")[2].strip(): r for r in table.splitlines() if r.startswith("| 5 |")}
    assert "(n=3)" in line["-a"] and "(n=6)" in line["-b"] and "(n=6)" in line["full"]
    assert "| +2.50 | [+1.26, +3.74] |" in line["-a"]  # the t-interval over seeds 0-2 only
    assert f"| {np.mean([1.0, -1.0, 0.5, 0.0, 1.0, -0.5]):+.2f} |" in line["-b"]


def test_seeds_auto_runs_a_second_round_for_an_arm_that_cannot_resolve(ray_local, tmp_path,
                                                                       mlflow_db, cache_dir, monkeypatch):
    """--seeds auto --max-seeds 3 from 2 seeds, dropping a component whose "off" is the
    default (head_l2 stays on): that arm is the full method, seed for seed, so its paired
    interval is [0, 0] and cannot exclude zero. Round 1 therefore cannot resolve it: a
    second Tune experiment must run seed 2 for it and for full, and the ablation stops
    there, at --max-seeds; no run is repeated and the table says the arm did not
    resolve. (That a resolved arm gets no more seeds is
    test_adaptive_seeds_add_rounds_only_to_unresolved_arms, over recorded rows.)"""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "abl"
    defs = write_defs(tmp_path / "defs.yaml", base={"method": "smile", "steps": 10, "eval_every": 10, **FEW_IL_PAIRS},
                      components={**DEFINITIONS["components"], "nothing": {"head_l2": True}})
    code = main(["ablate", "--definitions", str(defs), "--output", str(out), "--drop", "nothing",
                 "--seeds", "auto", "--max-seeds", "3", "--cache-dir", str(cache_dir)])
    assert code == 0
    rows = pq.read_table(out / "ablation.parquet").to_pylist()
    assert sorted((r["arm"], r["seed"]) for r in rows) == [("-nothing", s) for s in range(3)] + [("full", s)
                                                                                                 for s in range(3)]
    acc = {(r["arm"], r["seed"]): r["test_acc"] for r in rows}
    assert all(acc["-nothing", s] == acc["full", s] for s in range(3))  # why round 1 could not resolve it
    assert len(list((out / "tune").glob("*/run/metrics.json"))) == 4
    assert len(list((out / "tune-round2").glob("*/run/metrics.json"))) == 2 and not (out / "tune-round3").exists()
    state = json.loads((out / "ablation.json").read_text())
    assert state["max_seeds"] == 3 and [len(r) for r in state["rounds"]] == [4, 2] and len(state["runs"]) == 6
    md = (out / "ablation.md").read_text()
    assert "adaptive seeds (2 per round, at most 3" in md and "Adaptive seeds:" in md
    assert "3/class, -nothing: not resolved at 3 seeds" in md
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["seeds"] == "auto"
    kids = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(kids) == 6 and all(k.info.status == "FINISHED" for k in kids)
