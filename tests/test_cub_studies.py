"""A study end to end on a fixture CUB-200-2011 tree in its native layout (the image-file
pipeline under Ray Tune trials), as a user runs it: through the CLI, with the paper's
subset keys (C:67%/N:9 here) in the base config. One ablation with a tuning budget runs
both kinds of study, searches (``tune``'s path) and arms over seeds; each study costs
several seconds of Ray's start-up, so the module holds one."""
import json

import pyarrow.parquet as pq
import pytest
import yaml

import native_layouts as nl
from conftest import FEW_IL_PAIRS
from smile_ray.cli import main


@pytest.fixture(scope="module")
def cub_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub")
    nl.write_cub(root, classes=3, train=8, test=2)
    return {"method": "smile", "dataset": "cub200", "data_root": str(root), "backbone": "resnet18",
            "weights": "none", "image_size": 32, "batch_size": 8, "steps": 4, "eval_every": 2,
            "class_fraction": 0.67, "train_images": 9, "data_workers": 0, "threads": 1, **FEW_IL_PAIRS}


def test_ablate_with_a_tune_budget_on_a_cub_tree(ray_local, cub_base, tmp_path, mlflow_db, monkeypatch):
    """``ablate --tune-budget 2``: each arm's own search (Ray Tune trials on the image-file
    pipeline), then the arms over shared seeds, each with its search's best config. Each
    arm searches only what it still uses (the arm without source labels, no
    ``source_label_weight``)."""
    monkeypatch.chdir(tmp_path)
    defs = tmp_path / "defs.yaml"
    defs.write_text(yaml.safe_dump({
        "base": cub_base, "seeds": 2, "max_concurrent": 2,
        "components": {"source_label": {"source_label": False}, "feature_mixup": {"feature_mixup": False}},
        "tune_space": {"mixup_alpha": {"loguniform": [0.05, 2.0]}, "source_label_weight": {"loguniform": [0.01, 1.0]}},
    }))
    out = tmp_path / "abl"
    assert main(["ablate", "--definitions", str(defs), "--drop", "source_label", "--tune-budget", "2",
                 "--output", str(out), "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 0

    # the searches: two trials an arm, on the subset's classes and images
    full = pq.read_table(out / "tuning" / "full" / "trials.parquet").to_pylist()
    dropped = pq.read_table(out / "tuning" / "source_label" / "trials.parquet").to_pylist()
    assert len(full) == 2 and len(dropped) == 2
    assert all(r["status"] == "TERMINATED" and r["steps"] == 4 for r in full + dropped)
    assert "source_label_weight" in full[0] and "source_label_weight" not in dropped[0]
    trials = [json.loads(p.read_text()) for p in (out / "tuning" / "full" / "tune").glob("*/run/metrics.json")]
    assert len(trials) == 2
    for m in trials:
        assert m["dataset"] == "cub200" and len(m["classes"]) == 2 and m["split_sizes"]["train"] == 9
        assert len(m["history"]) == 2
    best = json.loads((out / "tuning" / "full" / "best.json").read_text())
    assert best["config"]["dataset"] == "cub200" and best["config"]["train_images"] == 9

    # the arms over two seeds, each with its own search's best config
    rows = pq.read_table(out / "ablation.parquet").to_pylist()
    assert sorted((r["arm"], r["seed"]) for r in rows) == [("-source_label", 0), ("-source_label", 1),
                                                           ("full", 0), ("full", 1)]
    used = json.loads(next(r for r in rows if r["arm"] == "full")["config"])
    assert used["mixup_alpha"] == best["config"]["mixup_alpha"]
    # the seeds draw different classes and images; the arms of one seed see the same ones
    runs = {(json.loads(p.read_text())["config"]["source_label"], json.loads(p.read_text())["config"]["seed"]):
            json.loads(p.read_text()) for p in (out / "tune").glob("*/run/metrics.json")}
    assert len(runs) == 4
    for seed in (0, 1):
        assert runs[True, seed]["classes"] == runs[False, seed]["classes"]
    assert "-source_label" in (out / "ablation.md").read_text()
