"""The Python API (smile_ray.api): what the CLI takes, data back, the same files; the
example of docs/python-api.md runs as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import FEW_IL_PAIRS
import smile_ray
from smile_ray.errors import SmileError

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
SMALL = {"samples_per_class": 2, "steps": 20, "eval_every": 10, "threads": 1, **FEW_IL_PAIRS}


def test_import_gives_every_function_documented_and_without_torch():
    import subprocess
    import sys

    code = ("import sys, smile_ray; "
            "print(all(callable(getattr(smile_ray, f)) and getattr(smile_ray, f).__doc__ for f in "
            "('train', 'tune', 'ablate', 'compare', 'report', 'load_model')), 'torch' in sys.modules, "
            "'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False"]


def test_train_takes_what_the_cli_takes_and_returns_data(tmp_path, cache_dir):
    # a shipped preset is not needed here: a dict base, a keyword key and --set strings
    run = smile_ray.train({"method": "l2", **SMALL}, tmp_path / "a", cache_dir=cache_dir, seed=3,
                          overrides=["eval_every=5"])
    assert run.config.method == "l2" and run.config.seed == 3 and run.config.eval_every == 5
    assert run["test_acc"] == run.test_acc == run.metrics["test_acc"]
    assert list(run.history["step"]) == [5, 10, 15, 20]
    assert run.reliability_png.stat().st_size > 5000  # written by the library, not the CLI
    assert run.model_file.is_file() and run.mlflow_run_id is None
    # a file base, as --config: the run's own metrics.json reproduces it
    again = smile_ray.train(tmp_path / "a" / "metrics.json", tmp_path / "b", cache_dir=cache_dir)
    assert again.config == run.config and again.metrics["history"] == run.metrics["history"]


def test_bad_input_is_a_smile_error_and_writes_nothing(tmp_path, cache_dir):
    with pytest.raises(SmileError, match="unknown config key 'mixup_alpa'"):
        smile_ray.train(output=tmp_path / "x", cache_dir=cache_dir, mixup_alpa=0.3)
    with pytest.raises(SmileError, match="need --workers"):
        smile_ray.train(output=tmp_path / "x", cache_dir=cache_dir, gpu=True)
    with pytest.raises(SmileError, match="no such file"):
        smile_ray.load_model(tmp_path / "x")
    with pytest.raises(SmileError, match="space must map config keys"):
        smile_ray.tune({"base": {"steps": 5}, "space": {}}, tmp_path / "s")
    assert not (tmp_path / "x").exists() and not (tmp_path / "s").exists()


def test_the_study_options_are_declared_once_and_a_resume_refuses_the_saved_ones(tmp_path):
    import inspect

    from smile_ray.api import STUDY_OPTIONS

    for f in (smile_ray.tune, smile_ray.ablate, smile_ray.compare):
        params = inspect.signature(f).parameters
        assert {n: params[n].default for n in STUDY_OPTIONS} == STUDY_OPTIONS, f.__name__
    with pytest.raises(SmileError, match="continues the ablation with its saved settings; drop --tracking-uri"):
        smile_ray.ablate(output=tmp_path / "a", resume=True, tracking_uri="sqlite:///x.db")
    with pytest.raises(SmileError, match="--seeds auto: adaptive seeds are an ablation's"):
        smile_ray.compare(output=tmp_path / "c", seeds="auto")
    assert not any(tmp_path.iterdir())


def test_load_model_predicts_what_the_run_measured(tmp_path, cache_dir):
    run = smile_ray.train(output=tmp_path / "r", cache_dir=cache_dir, **SMALL)  # smile: with a source-label head
    loaded = smile_ray.load_model(tmp_path / "r")
    assert not loaded.model.training and loaded.config == run.config
    x, y = loaded.split("test", cache_dir=cache_dir)
    assert (loaded.predict(loaded.transform(x[0])) == loaded.predict(x[:1])).all()
    assert (loaded.predict(x) == y).float().mean().item() == pytest.approx(run.test_acc, abs=1e-9)
    (tmp_path / "r" / "model.pt").write_bytes(b"not a model")
    with pytest.raises(SmileError, match="cannot load the fine-tuned model"):
        smile_ray.load_model(tmp_path / "r" / "model.pt")


def test_the_transform_of_an_image_dataset_is_its_evaluation_pipeline(tmp_path, cache_dir):
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for c in ("cat", "dog"):
            folder = tmp_path / "images" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    run = smile_ray.train(output=tmp_path / "r", cache_dir=cache_dir, method="l2", dataset="image_folder",
                          data_root=str(tmp_path / "images"), backbone="resnet18", weights="none", image_size=32,
                          samples_per_class=4, steps=2, eval_every=2, batch_size=4, data_workers=0, threads=1)
    loaded = smile_ray.load_model(run.output)
    x, y = loaded.split("test")
    files = sorted((tmp_path / "images" / "test").glob("*/*.jpg"))
    mine = torch.cat([loaded.transform(Image.open(f)) for f in files])
    assert mine.shape == x.shape and torch.equal(mine, x)


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_python_api_example_runs(tmp_path, cache_dir, monkeypatch, ray_local):
    """docs/python-api.md's code blocks, in order, in a fresh folder: train, reload,
    a four-trial study in MLflow, its best model back from MLflow. On the session's Ray:
    the study finds it running, as it would a Ray the user started (that the functions
    start one where none runs is the CLI tests', whose commands start their own)."""
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SMILE_RAY_CACHE", str(cache_dir))
    blocks = doc_blocks()
    assert len(blocks) >= 4
    scope: dict = {}
    running = ray.is_initialized()  # the example starts Ray where none runs; stop only that one
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), scope)
    finally:
        if not running:
            ray.shutdown()
    study = scope["study"]
    assert len(study.trials) == 4 and (tmp_path / "runs" / "py-study" / "space.yaml").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient("sqlite:///mlflow.db")
    parent = scope["parent"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    for child in children:  # every trial's model, with the code version
        names = {a.path for a in client.list_artifacts(child.info.run_id, "model")}
        assert names == {"model/model.pt", "model/metrics.json"}
        assert "smile_ray.version" in child.data.tags
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "best_model")} == {
        "best_model/model.pt", "best_model/metrics.json"}
    best_child = parent.data.tags["best_model_uri"].split("/")[1]
    assert client.get_run(best_child).data.tags["trial_id"] == study.best["trial_id"]
    assert scope["best"].config == study.best_config
