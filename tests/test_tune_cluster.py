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
from conftest import descendants

RAY = str(Path(sys.executable).with_name("ray"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args, env):
    """``ray start --block``: the node's processes stay below this child process, so the
    test can stop exactly them (``ray stop`` would stop every Ray on the machine)."""
    return subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for_port(port, deadline):
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no Ray head on port {port}")


def stop_nodes(nodes):
    """SIGTERM, then SIGKILL, to the node processes and everything below them, by pid."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for node in nodes if node.poll() is None for p in [node.pid, *descendants(node.pid)]]
        for node in nodes:  # processes a node left behind when it exited
            pids += descendants(node.pid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + 15
        while time.time() < deadline and any(node.poll() is None for node in nodes):
            time.sleep(0.5)


def test_study_on_an_existing_multi_node_cluster(tmp_path, cache_dir):
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="smile-ray-cluster-", dir="/tmp")  # short: Ray's socket paths
    # Ray 2.60's `ray start` turns token authentication on by default; this throwaway
    # loopback cluster opts out so that the client needs no token file.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "SMILE_RAY_CACHE": str(cache_dir)}
    nodes = [start_node(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                         "--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"], env)]
    try:
        wait_for_port(port, time.time() + 60)
        nodes.append(start_node([f"--address=127.0.0.1:{port}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                                 f"--temp-dir={temp_dir}"], env))
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
        stop_nodes(nodes)
