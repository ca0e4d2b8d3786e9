"""Joining a Ray cluster (:mod:`smile_ray.orchestration.cluster`) and the cluster file
it is launched from (``cluster/gpu.yaml``); no Ray is started here."""
import subprocess
import sys
from pathlib import Path

import yaml


def test_unreachable_address_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "smile_ray", "train", "--workers", "1", "--address", "127.0.0.1:9",
         "--output", str(tmp_path / "x"), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach a Ray cluster at --address '127.0.0.1:9'" in lines[0], proc.stderr


def test_cluster_file_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("cluster", "gpu.yaml").read_text())
    validate_config(prepare_config(raw))  # what `ray up` applies before launching anything
    assert raw["file_mounts"]["~/smile-ray"] == "."
    for kind in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "~/smile-ray" in c for c in raw[kind])
    workers = {k: v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]}
    assert workers and all(v["resources"].get("GPU", 0) >= 1 for v in workers.values())
    assert raw["available_node_types"][raw["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert raw["idle_timeout_minutes"] > 0 and raw["max_workers"] >= 1


def test_cluster_file_boots_the_torch_the_project_is_tested_with():
    """No `latest_dlami` (in Ray 2.60 a 2023 image whose driver cannot run a CUDA 13
    torch); every node installs exactly this environment's torch and torchvision; GPU
    nodes check the driver first; the study bucket is named in one place."""
    import torch
    import torchvision

    text = Path(__file__).resolve().parents[1].joinpath("cluster", "gpu.yaml").read_text()
    raw = yaml.safe_load(text)
    assert "latest_dlami" not in {t["node_config"]["ImageId"] for t in raw["available_node_types"].values()}
    pins = f"torch=={torch.__version__.split('+')[0]} torchvision=={torchvision.__version__.split('+')[0]}"
    head, workers = " ".join(raw["head_setup_commands"]), " ".join(raw["worker_setup_commands"])
    assert pins in head and pins in workers
    assert workers.index("nvidia-smi") < workers.index(pins)  # the driver is checked before anything is installed
    assert raw["docker"]["head_image"].startswith("rayproject/ray:") and "gpu" not in raw["docker"]["head_image"]
    commands = [c for k, v in raw.items() if k.endswith("_commands") for c in v]
    assert [c for c in commands if "s3://" in c] == ["echo 'export SMILE_RAY_STORAGE=s3://YOUR-BUCKET/smile-ray' >> ~/.bashrc"]
    assert "--artifacts-destination $SMILE_RAY_STORAGE" in head
