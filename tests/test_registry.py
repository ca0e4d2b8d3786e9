"""Registries open to users: ``smile_ray.register_method / register_dataset /
register_backbone`` in the process, and entry points of an installed package (a tiny
package with its dist-info written into a temporary folder on ``sys.path``), used by
name in the CLI's commands and listed in ``--help``; a taken name gets one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import smile_ray
from smile_ray.errors import SmileError
from smile_ray.registry import BACKBONES, DATASETS, METHODS, Registry

ROOT = Path(__file__).resolve().parents[1]

PACKAGE = '''
"""A user's own method, dataset and backbone, outside smile-ray."""
from collections import OrderedDict

import torch
from torch import nn

from smile_ray.data import DatasetSpec, TensorTask
from smile_ray.methods.base import Method
from smile_ray.models import BackboneSpec


class HalfLoss(Method):
    """Plain fine-tuning at half the loss: a method smile-ray does not know."""

    def loss(self, model, x, y, step):
        loss, parts = self.plain_loss(model, x, y)
        return 0.5 * loss, parts


def target(config, cache_dir=None):
    g = torch.Generator().manual_seed(0)

    def split(n):
        return torch.rand(n * 2, 1, config.image_size, config.image_size, generator=g), torch.arange(2).repeat(n)

    return TensorTask({"train": split(3), "val": split(2), "test": split(2)}, 2, config.seed)


def build(num_source_classes):
    body = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 4, 3, padding=1), relu=nn.ReLU()))
    return body, nn.Linear(4, num_source_classes)


NOISE = DatasetSpec(target=target)
TINY_NET = BackboneSpec(build, in_channels=1, source_classes=3)
'''


def install(root: Path, entry_points: str, name: str = "smile_extras") -> Path:
    """``name`` as pip would install it: the module and a dist-info declaring its entry points."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.py").write_text(PACKAGE)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    (info / "top_level.txt").write_text(name + "\n")
    (info / "RECORD").write_text("")
    return root


def smile_ray_cli(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "smile_ray", *args], capture_output=True, text=True, env=env,
                          timeout=600)


ENTRY_POINTS = """
    [smile_ray.methods]
    half_loss = smile_extras:HalfLoss

    [smile_ray.datasets]
    noise = smile_extras:NOISE

    [smile_ray.backbones]
    tiny_net = smile_extras:TINY_NET
"""


def test_an_installed_package_adds_a_method_a_dataset_and_a_backbone(tmp_path):
    site = install(tmp_path / "site", ENTRY_POINTS)
    help_text = smile_ray_cli(site, "train", "--help").stdout
    for name in ("half_loss", "noise", "tiny_net"):
        assert name in help_text
    out = tmp_path / "run"
    run = smile_ray_cli(site, "train", "--method", "half_loss", "--dataset", "noise", "--set", "backbone=tiny_net",
                        "--set", "weights=none", "--set", "steps=2", "--set", "eval_every=2", "--set",
                        "batch_size=4", "--set", "image_size=8", "--output", str(out), "--quiet",
                        "--cache-dir", str(tmp_path / "cache"))
    assert run.returncode == 0, run.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "half_loss" and metrics["config"]["backbone"] == "tiny_net"
    assert metrics["steps"] == 2


def test_an_entry_point_that_takes_a_name_gets_one_line(tmp_path):
    site = install(tmp_path / "site", """
        [smile_ray.methods]
        smile = smile_extras:HalfLoss
    """)
    run = smile_ray_cli(site, "config")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert "smile = smile_extras:HalfLoss" in lines[0] and "method 'smile' is already registered" in lines[0]


def test_register_in_the_process_and_clashes(tmp_path):
    sys.path.insert(0, str(install(tmp_path / "site", "")))
    try:
        import smile_extras
    finally:
        sys.path.pop(0)
    if "noise_here" not in DATASETS:
        smile_ray.register_dataset("noise_here", smile_extras.NOISE)
        smile_ray.register_backbone("tiny_here", "smile_extras:TINY_NET")  # by reference, imported when built
        smile_ray.register_method("half_here", smile_extras.HalfLoss)
    assert DATASETS.get("noise_here") is smile_extras.NOISE and METHODS.get("half_here") is smile_extras.HalfLoss
    assert BACKBONES.get("tiny_here") is smile_extras.TINY_NET
    config = smile_ray.make_config({"method": "half_here", "dataset": "noise_here", "backbone": "tiny_here",
                                    "weights": "none", "steps": 2, "eval_every": 2, "batch_size": 4,
                                    "image_size": 8})
    metrics = smile_ray.train(config, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert (tmp_path / "run" / "metrics.json").is_file() and metrics is not None
    for register, name, what in ((smile_ray.register_method, "smile", "smile_ray.methods.smile:Smile"),
                                 (smile_ray.register_dataset, "noise_here", "a DatasetSpec registered in this process"),
                                 (smile_ray.register_backbone, "resnet34", "a name smile-ray builds by pattern")):
        with pytest.raises(SmileError, match=f"'{name}' is already registered .*{what}.*; pick another name"):
            register(name, object())
    with pytest.raises(SmileError, match="is not a name"):
        smile_ray.register_method("two words", object())


def test_a_registry_suggests_close_names():
    reg = Registry("thing", {"alpha": "x:y", "beta": "x:z"}, group="smile_ray.tests_none")
    with pytest.raises(SmileError, match=r"unknown thing 'alpah' \(choose from: alpha, beta\); did you mean alpha"):
        reg.check("alpah")
