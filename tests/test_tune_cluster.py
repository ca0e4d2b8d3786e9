"""``smile-ray tune --address``: a study on an existing two-node Ray cluster started with
``ray start`` (both nodes on this machine, sharing its disk), with ``--storage`` a folder
that every node sees at the same path (EFS or NFS on a real cluster)."""
import os
import subprocess
import sys

import pyarrow.parquet as pq
import yaml
from ray_nodes import Cluster


def test_study_on_an_existing_multi_node_cluster_with_a_shared_folder(tmp_path, cache_dir):
    cluster = Cluster({**os.environ, "SMILE_RAY_CACHE": str(cache_dir)}, head_cpus=1)
    try:
        cluster.add_worker(cpus=1)
        cluster.wait_for_nodes(2)
        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump({
            "base": {"method": "mixup", "steps": 20, "eval_every": 10, "samples_per_class": 3},
            "num_samples": 2, "max_concurrent": 2, "search": "random",
            "space": {"mixup_alpha": {"uniform": [0.1, 1.0]}},
        }))
        out, shared = tmp_path / "study", tmp_path / "shared"
        proc = subprocess.run(
            [sys.executable, "-m", "smile_ray", "tune", "--space", str(space), "--output", str(out),
             "--address", cluster.address, "--storage", str(shared)],
            cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=400,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = pq.read_table(out / "trials.parquet").to_pylist()
        assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows)
        # the trials' folders are in the shared folder; their metrics came home to --output
        assert len(list((shared / "study" / "tune").glob("*/run/model.pt"))) == 2
        assert len(list((out / "tune").glob("*/run/metrics.json"))) == 2
    finally:
        cluster.stop()
