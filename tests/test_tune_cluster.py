"""``smile-ray tune --address``: a study on an existing two-node Ray cluster started with
``ray start`` (both nodes on this machine)."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

RAY = str(Path(sys.executable).with_name("ray"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir):
    """Stop only the processes of the cluster rooted at ``temp_dir``: ``ray stop`` would
    stop every Ray on this machine, a user's own included."""
    deadline = time.time() + 30
    sig = signal.SIGTERM
    while time.time() < deadline:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    cmd = (entry / "cmdline").read_bytes().decode(errors="ignore")
                except OSError:
                    continue
                if temp_dir in cmd:
                    pids.append(int(entry.name))
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(1)
        sig = signal.SIGKILL if time.time() > deadline - 20 else signal.SIGTERM


def test_study_on_an_existing_multi_node_cluster(tmp_path, cache_dir):
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="smile-ray-cluster-", dir="/tmp")  # short: Ray's socket paths
    # Ray 2.60's `ray start` turns token authentication on by default; this throwaway
    # loopback cluster opts out so that the client needs no token file.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "SMILE_RAY_CACHE": str(cache_dir)}
    head = [RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
            "--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"]
    subprocess.run(head, check=True, env=env, capture_output=True)
    try:
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                        f"--temp-dir={temp_dir}"],
                       check=True, env=env, capture_output=True)
        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump({
            "base": {"method": "mixup", "steps": 20, "eval_every": 10, "samples_per_class": 3},
            "num_samples": 2, "max_concurrent": 2, "search": "random",
            "space": {"mixup_alpha": {"uniform": [0.1, 1.0]}},
        }))
        out = tmp_path / "study"
        proc = subprocess.run(
            [sys.executable, "-m", "smile_ray", "tune", "--space", str(space), "--output", str(out),
             "--address", f"127.0.0.1:{port}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = pq.read_table(out / "trials.parquet").to_pylist()
        assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows)
    finally:
        stop_cluster(temp_dir)
