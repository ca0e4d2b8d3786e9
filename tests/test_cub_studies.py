"""`smile-ray tune` and `smile-ray ablate` end to end on a fixture CUB-200-2011 tree in
its native layout (the image-file pipeline under Ray Tune trials), as a user runs them:
through the CLI, with the paper's subset keys (C:67%/N:9 here) in the base config."""
import json

import pyarrow.parquet as pq
import pytest
import yaml

import native_layouts as nl
from smile_ray.cli import main


@pytest.fixture(scope="module")
def cub_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub")
    nl.write_cub(root, classes=3, train=8, test=2)
    return {"method": "smile", "dataset": "cub200", "data_root": str(root), "backbone": "resnet18",
            "weights": "none", "image_size": 32, "batch_size": 8, "steps": 4, "eval_every": 2,
            "class_fraction": 0.67, "train_images": 9, "data_workers": 0, "threads": 1}


def test_tune_on_a_cub_tree(ray_local, cub_base, tmp_path, mlflow_db, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"base": cub_base, "num_samples": 2, "search": "random", "max_concurrent": 2,
                                     "space": {"mixup_alpha": {"loguniform": [0.05, 2.0]}}}))
    out = tmp_path / "study"
    assert main(["tune", "--space", str(space), "--output", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["steps"] == 4 for r in rows)
    runs = [json.loads(p.read_text()) for p in (out / "tune").glob("*/run/metrics.json")]
    assert len(runs) == 2
    for m in runs:
        assert m["dataset"] == "cub200" and len(m["classes"]) == 2 and m["split_sizes"]["train"] == 9
        assert len(m["history"]) == 2
    best = json.loads((out / "best.json").read_text())
    assert best["config"]["dataset"] == "cub200" and best["config"]["train_images"] == 9


def test_ablate_on_a_cub_tree(ray_local, cub_base, tmp_path, mlflow_db, monkeypatch):
    monkeypatch.chdir(tmp_path)
    defs = tmp_path / "defs.yaml"
    defs.write_text(yaml.safe_dump({"base": cub_base, "seeds": 2, "max_concurrent": 2,
                                    "components": {"source_label": {"source_label": False},
                                                   "feature_mixup": {"feature_mixup": False}}}))
    out = tmp_path / "abl"
    assert main(["ablate", "--definitions", str(defs), "--drop", "source_label", "--output", str(out),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    rows = pq.read_table(out / "ablation.parquet").to_pylist()
    assert sorted((r["arm"], r["seed"]) for r in rows) == [("-source_label", 0), ("-source_label", 1),
                                                           ("full", 0), ("full", 1)]
    # the seeds draw different classes and images; the arms of one seed see the same ones
    runs = {(json.loads(p.read_text())["config"]["source_label"], json.loads(p.read_text())["config"]["seed"]):
            json.loads(p.read_text()) for p in (out / "tune").glob("*/run/metrics.json")}
    assert len(runs) == 4
    for seed in (0, 1):
        assert runs[True, seed]["classes"] == runs[False, seed]["classes"]
    assert "-source_label" in (out / "ablation.md").read_text()
