"""The paper's Tables 2 and 3, one shipped comparison-settings file per cell
(``search_spaces/compare/paper_*.yaml``): each file validates for its table's methods,
holds the paper's protocol, and its path (settings -> the column's config -> a training
run) runs on a fixture tree in the dataset's native layout with a few steps; one file
goes end to end through ``smile-ray compare`` under Ray with ``--storage``.

Sizes are overridden so that a run is small (2 steps of batch 4 at 32 px on the CPU,
random weights, the C:25%/N:Y cells' N cut to the fixture's images, the interpolation
losses on 2 pairs); everything else is the file's.
"""
from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import yaml

import native_layouts as nl
from smile_ray.config import SHIPPED, make_config
from smile_ray.orchestration.spaces import load_settings
from smile_ray.recipe import train
from smile_ray.registry import BACKBONES

TABLE2 = ["l2", "mixup", "l2sp", "delta", "bss", "rifle", "cotuning", "regsl", "smile"]
TABLE3 = ["l2", "mixup", "delta", "bss", "rifle", "smile"]
TABLE2_CELLS = {"c25_n400": {"class_fraction": 0.25, "train_images": 400},
                "c25_n800": {"class_fraction": 0.25, "train_images": 800},
                "call_n15": {"sample_rate": 0.15}, "call_n100": {"sample_rate": 1.0}}
TABLE3_CELLS = {"rate30": {"sample_rate": 0.3}, "rate50": {"sample_rate": 0.5}, "rate100": {"sample_rate": 1.0}}
#: dataset -> (cells, methods, backbone, weights, fixture writer)
DATASETS = {
    "cub200": (TABLE2_CELLS, TABLE2, "resnet50", "IMAGENET1K_V1", lambda root: nl.write_cub(root, classes=4, train=8)),
    "stanford_cars": (TABLE2_CELLS, TABLE2, "resnet50", "IMAGENET1K_V1",
                      lambda root: nl.write_cars_folders(root, classes=3, train=6, test=2)),
    "fgvc_aircraft": (TABLE2_CELLS, TABLE2, "resnet50", "IMAGENET1K_V1", lambda root: nl.write_aircraft(root)),
    "mit_indoor67": (TABLE3_CELLS, TABLE3, "resnet50", "/data/weights/resnet50_places365.pth.tar",
                     lambda root: nl.write_indoor(root)),
    "food101": (TABLE3_CELLS, TABLE3, "efficientnet_b4", "imagenet", lambda root: nl.write_food101(root, train=6)),
}
FILES = [(ds, cell) for ds, (cells, *_) in DATASETS.items() for cell in cells]
#: what every file's runs share: the reference's protocol on one GPU each
PROTOCOL = {"image_size": 224, "batch_size": 48, "steps": 9000, "lr": 0.01, "precision": "bf16", "device": "cuda"}
SMALL = {"steps": 2, "eval_every": 2, "image_size": 32, "batch_size": 4, "device": "cpu", "precision": "fp32",
         "il_pairs": 2, "channels_last": "false", "data_workers": 0, "weights": "none", "threads": 1}


def needs_backbone(ds):
    BACKBONES.check(DATASETS[ds][2])  # torchvision's names, built by pattern


def test_every_cell_of_tables_2_and_3_has_one_file():
    shipped = sorted(p.stem for p in (SHIPPED / "compare").glob("paper_*.yaml"))
    assert shipped == sorted(f"paper_{ds}_{cell}" for ds, cell in FILES)
    assert len(shipped) == 3 * 4 + 2 * 3


@pytest.mark.parametrize("ds, cell", FILES)
def test_a_file_holds_the_papers_protocol_for_its_tables_methods(ds, cell):
    needs_backbone(ds)
    cells, methods, backbone, weights, _ = DATASETS[ds]
    settings = load_settings(f"paper_{ds}_{cell}", methods)  # by name, as the command line reads it
    assert list(settings.columns.values()) == [cells[cell]]
    base = settings.base
    assert (base.dataset, base.backbone, base.weights) == (ds, backbone, weights)
    assert {k: getattr(base, k) for k in PROTOCOL} == PROTOCOL
    assert base.resolved_lr_decay_step == 6666 and base.plain_tail_start == 8000  # the reference's schedule
    for m in methods:  # every method's run of the cell is a valid config
        config = make_config({**base.to_dict(), **cells[cell], "method": m})
        assert {k: getattr(config, k) for k in cells[cell]} == cells[cell]
    assert (settings.resources.gpus, settings.resources.workers) == (1, 1) and settings.seeds >= 3
    text = (SHIPPED / "compare" / f"paper_{ds}_{cell}.yaml").read_text()
    assert f"--settings paper_{ds}_{cell}" in text and "--storage $SMILE_RAY_STORAGE" in text
    assert f"--methods {','.join(methods)}" in text


@pytest.mark.parametrize("ds, cell", FILES)
def test_a_files_path_trains_on_a_fixture_tree(ds, cell, tmp_path, cache_dir):
    needs_backbone(ds)
    cells, methods, *_, write = DATASETS[ds]
    write(tmp_path)
    settings = load_settings(f"paper_{ds}_{cell}", methods, {"data_root": str(tmp_path)})
    (column,) = settings.columns.values()
    method = methods[FILES.index((ds, cell)) % len(methods)]  # every method of each table runs somewhere
    values = {**settings.base.to_dict(), **column, "method": method, **SMALL}
    if values["train_images"]:  # the fixture's kept classes hold a few images, not N
        values["train_images"] = 2
    if method == "delta":  # the attention's one-off pre-training is the GPU's job, not this test's
        values["delta_variant"] = "feature_map"
    metrics = train(make_config(values), tmp_path / "run", cache_dir=cache_dir, log=lambda m: None)
    assert metrics["method"] == method and metrics["dataset"] == ds and metrics["steps"] == 2
    assert math.isfinite(metrics["history"][-1]["train_loss"]) and 0 <= metrics["test_acc"] <= 1
    assert (tmp_path / "run" / "model.pt").is_file()


def test_a_file_end_to_end_through_compare_with_storage(ray_local, tmp_path, mlflow_db, cache_dir, monkeypatch):
    from smile_ray.cli import main

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "cub"
    nl.write_cub(root, classes=4, train=8)
    raw = yaml.safe_load((SHIPPED / "compare" / "paper_cub200_c25_n400.yaml").read_text())
    # the file as shipped, but small: sizes, and one CPU per run instead of a GPU
    raw["base"].update({**SMALL, "data_root": str(root)})
    raw["columns"] = {name: {**col, "train_images": 2} for name, col in raw["columns"].items()}
    raw.update(resources={"cpus": 1, "gpus": 0, "workers": 1}, max_concurrent=2)
    settings = tmp_path / "paper_cub200_c25_n400.yaml"
    settings.write_text(yaml.safe_dump(raw))
    out, storage = tmp_path / "out", tmp_path / "bucket"
    assert main(["compare", "--settings", str(settings), "--methods", "l2,smile", "--seeds", "2",
                 "--output", str(out), "--storage", str(storage), "--cache-dir", str(cache_dir)]) == 0
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted((r["method"], r["setting"], r["seed"]) for r in rows) == [
        ("l2", "C25-N400", 0), ("l2", "C25-N400", 1), ("smile", "C25-N400", 0), ("smile", "C25-N400", 1)]
    for r in rows:
        config = json.loads(r["config"])
        assert (config["class_fraction"], config["train_images"], config["backbone"]) == (0.25, 2, "resnet50")
    assert "| method | C25-N400 |" in (out / "table.md").read_text()
    assert any(storage.rglob("model.pt"))  # the runs kept their files in the storage
