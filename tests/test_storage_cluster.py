"""Commands on an existing two-node cluster started with ``ray start``, laid out as a GPU
cluster is: a head that runs no trial and a worker node that shares no disk with it (its
own mount namespace, a tmpfs over the folder where the outputs go; needs root, as in CI).
With ``--storage`` on a local S3-protocol server (moto), a study, an ablation and
``train --workers 2`` must finish with every file reachable; without ``--storage`` the
cluster is refused at once. With ``--storage`` a folder that every node sees at the same
path (EFS or NFS on a real cluster), a study's trials write there and their metrics come
home to ``--output``.

The cluster is started once for the module. Each command is the real CLI's ``main``,
run in this process, which joins the cluster as a driver as ``smile-ray ... --address``
does (a process per command would only import torch and Ray again), and leaves it at the
module's end. A process that has run a local Ray of its own cannot join this cluster
(Ray's local start turns token authentication on for the whole process, the cluster's is
off: the trials' actors never start), so this module runs before any test that starts
one in this process (the ``joins_cluster`` mark, read by
:func:`conftest.pytest_collection_modifyitems`).
"""
import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml
from ray_nodes import Cluster, can_hide_folders, free_port, wait_for_port

from smile_ray.cli import main

pytestmark = pytest.mark.joins_cluster
hides = pytest.mark.skipif(not can_hide_folders(), reason="needs root for a mount namespace per Ray node")

BUCKET = "smile-ray-test"
STEPS = ["--set", "steps=20", "--set", "eval_every=10", "--set", "samples_per_class=3", "--set", "il_pairs=8"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on loopback, with one bucket; the environment every node and
    client uses to reach it (AWS_ENDPOINT_URL, as the AWS SDKs and pyarrow read it)."""
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    server = subprocess.Popen([str(os.path.join(os.path.dirname(sys.executable), "moto_server")),
                               "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        wait_for_port(port, time.time() + 60)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        yield env, client
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3, cache_dir):
    """Head: no CPU for trials (like cluster/gpu.yaml's). Worker: 2 CPUs, and (as root) a
    tmpfs over ``outputs/``, so it cannot see a file the head writes there, nor the head
    one it writes there. This process's environment is the nodes' while the module runs
    (the S3 endpoint, the cache), and its Ray, once a command joined, is left at the end."""
    import ray

    outputs = tmp_path_factory.mktemp("outputs")
    env = {**s3[0], "SMILE_RAY_CACHE": str(cache_dir)}
    c = Cluster({**os.environ, **env}, head_cpus=0)
    saved = {k: os.environ.get(k) for k in [*env, "RAY_AUTH_MODE"]}
    try:
        c.add_worker(cpus=2, hide=outputs if can_hide_folders() else None)
        c.wait_for_nodes(2)
        c.outputs = outputs
        os.environ.update({**env, "RAY_AUTH_MODE": c.env["RAY_AUTH_MODE"]})
        yield c
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        c.stop()


def smile_ray(cluster, monkeypatch, capfd, *args):
    """``smile-ray ARGS --address CLUSTER`` run from the outputs folder: (exit code, stderr)."""
    monkeypatch.chdir(cluster.outputs)
    monkeypatch.setenv("SMILE_RAY_CACHE", cluster.env["SMILE_RAY_CACHE"])
    capfd.readouterr()
    code = main([*args, "--address", cluster.address])
    return code, capfd.readouterr().err


def keys(client, prefix):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def space_file(cluster):
    path = cluster.outputs / "space.yaml"
    path.write_text(yaml.safe_dump({
        "base": {"method": "mixup", "steps": 20, "eval_every": 10, "samples_per_class": 3, "il_pairs": 8},
        "num_samples": 2, "max_concurrent": 2, "search": "random",
        "space": {"mixup_alpha": {"uniform": [0.1, 1.0]}},
    }))
    return path


def test_a_cluster_without_storage_is_refused_at_once(cluster, monkeypatch, capfd):
    out = cluster.outputs / "refused"
    code, err = smile_ray(cluster, monkeypatch, capfd, "tune", "--space", str(space_file(cluster)), "--output", str(out))
    assert code == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--storage" in lines[0] and "2 nodes" in lines[0], err
    assert not out.exists()  # nothing half-written


def test_an_unreachable_bucket_is_one_line(cluster, monkeypatch, capfd):
    out = cluster.outputs / "nobucket"
    code, err = smile_ray(cluster, monkeypatch, capfd, "tune", "--space", str(space_file(cluster)), "--output",
                          str(out), "--storage", "s3://no-such-bucket/studies")
    assert code == 2, err[-3000:]
    assert err.strip().splitlines() == ["error: --storage 's3://no-such-bucket/studies': bucket "
                                        "'no-such-bucket' does not exist"]
    assert not out.exists()


@hides
def test_study_with_s3_storage_on_a_node_that_shares_no_disk(cluster, s3, monkeypatch, capfd):
    client = s3[1]
    out = cluster.outputs / "study"
    code, err = smile_ray(cluster, monkeypatch, capfd, "tune", "--space", str(space_file(cluster)), "--output",
                          str(out), "--storage", f"s3://{BUCKET}/studies")
    assert code == 0, err[-3000:]
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows)
    assert json.loads((out / "study.json").read_text())["storage_root"] == f"s3://{BUCKET}/studies/study"
    # every trial's run folder is in the bucket, written from the worker node ...
    stored = keys(client, "studies/study/tune/")
    assert len([k for k in stored if k.endswith("/run/model.pt")]) == 2
    assert len([k for k in stored if k.endswith("/run/metrics.json")]) == 2
    # ... and its metrics came home, so that report reads the study from --output alone
    homes = sorted((out / "tune").glob("*/run/metrics.json"))
    assert len(homes) == 2 and all(json.loads(p.read_text())["steps"] == 20 for p in homes)
    assert main(["report", str(out), "--output", str(cluster.outputs / "report.md")]) == 0, capfd.readouterr().err
    assert "No trial metrics.json" not in (cluster.outputs / "report.md").read_text()
    # --resume reads the experiment from storage: a finished study resumes to the same best trial
    best = json.loads((out / "best.json").read_text())
    code, err = smile_ray(cluster, monkeypatch, capfd, "tune", "--output", str(out), "--resume")
    assert code == 0, err[-3000:]
    assert json.loads((out / "best.json").read_text())["trial_id"] == best["trial_id"]


@hides
def test_ablation_with_s3_storage(cluster, s3, monkeypatch, capfd):
    out = cluster.outputs / "ablation"
    code, err = smile_ray(cluster, monkeypatch, capfd, "ablate", "--drop", "source_label", "--seeds", "2", *STEPS,
                          "--output", str(out), "--storage", f"s3://{BUCKET}/studies")
    assert code == 0, err[-3000:]
    rows = pq.read_table(out / "ablation.parquet").to_pylist()
    assert sorted(r["arm"] for r in rows) == ["-source_label"] * 2 + ["full"] * 2
    assert len([k for k in keys(s3[1], "studies/ablation/") if k.endswith("/run/model.pt")]) == 4
    assert len(list((out / "tune").glob("*/run/metrics.json"))) == 4


@hides
def test_train_on_two_workers_with_s3_storage(cluster, s3, monkeypatch, capfd):
    out = cluster.outputs / "ddp"
    code, err = smile_ray(cluster, monkeypatch, capfd, "train", "--workers", "2", "--cpus-per-worker", "1", "--quiet",
                          *STEPS, "--output", str(out), "--storage", f"s3://{BUCKET}/train")
    assert code == 0, err[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["steps"] == 20 and metrics["ranks_consistent"] is True
    assert (out / "model.pt").is_file() and (out / "checkpoint" / "state.pt").is_file()
    assert any(k.endswith("state.pt") for k in keys(s3[1], "train/"))  # Ray Train's checkpoints


def test_study_with_a_shared_folder_as_storage(cluster, tmp_path, monkeypatch, capfd):
    """``--storage`` a folder every node sees (here: outside the worker's hidden folder):
    the trials, on the worker node, write their folders there; their metrics come home."""
    out, shared = tmp_path / "study", tmp_path / "shared"
    code, err = smile_ray(cluster, monkeypatch, capfd, "tune", "--space", str(space_file(cluster)), "--output",
                          str(out), "--storage", str(shared))
    assert code == 0, err[-3000:]
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows)
    assert len(list((shared / "study" / "tune").glob("*/run/model.pt"))) == 2
    assert len(list((out / "tune").glob("*/run/metrics.json"))) == 2
