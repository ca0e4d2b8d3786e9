"""Throwaway Ray clusters of several nodes on this machine, for the tests that need one.

Each node is ``ray start --block`` in a session of its own, so a test stops exactly the
processes it started (``ray stop`` would stop every Ray on the machine). A worker node
may get a mount namespace of its own with a tmpfs over a folder, so that it shares no
disk with the head there, like a GPU node of a real cluster (needs root, as in CI).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import descendants

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_hide_folders() -> bool:
    """Whether this process may give a child its own mount namespace (root on Linux)."""
    return sys.platform == "linux" and os.geteuid() == 0 and shutil.which("unshare") is not None


def start_node(args: list[str], env: dict[str, str], hide: Path | None = None) -> subprocess.Popen:
    """``ray start --block ARGS``; with ``hide``, in a mount namespace of its own where a
    fresh tmpfs covers ``hide``: the node sees none of the files the head writes there."""
    cmd = [RAY, "start", "--block", *args]
    if hide is not None:
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"',
               str(hide), *cmd]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def wait_for_port(port: int, deadline: float) -> None:
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing listens on port {port}")


def stop_nodes(nodes: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL, to the node processes and everything below them, by pid
    (``ray start --block`` takes over 15 s to stop its node on SIGTERM; what is left after
    2 s is killed)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for node in nodes if node.poll() is None for p in [node.pid, *descendants(node.pid)]]
        for node in nodes:  # processes a node left behind when it exited
            pids += descendants(node.pid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + (2 if sig == signal.SIGTERM else 15)
        while time.time() < deadline and any(node.poll() is None for node in nodes):
            time.sleep(0.5)


class Cluster:
    """A head and worker nodes on loopback; ``address`` is what ``--address`` takes."""

    def __init__(self, env: dict[str, str], head_cpus: int = 1):
        self.port = free_port()
        # short: Ray's socket paths must fit in 107 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="smile-ray-cluster-", dir="/tmp")
        # Ray 2.60's `ray start` turns token authentication on by default; this throwaway
        # loopback cluster opts out so that the client needs no token file.
        self.env = {**env, "RAY_AUTH_MODE": "disabled"}
        self.nodes = [start_node(["--head", f"--port={self.port}", f"--num-cpus={head_cpus}", "--num-gpus=0",
                                  "--include-dashboard=false", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                                  f"--temp-dir={self.temp_dir}"], self.env)]
        wait_for_port(self.port, time.time() + 60)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_worker(self, cpus: int, hide: Path | None = None) -> None:
        self.nodes.append(start_node([f"--address={self.address}", f"--num-cpus={cpus}", "--num-gpus=0",
                                      "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}"], self.env, hide))

    def wait_for_nodes(self, n: int, timeout: float = 90) -> None:
        code = ("import ray, time, sys\n"
                f"ray.init(address='{self.address}', logging_level='ERROR')\n"
                f"t = time.time() + {timeout}\n"
                f"while sum(x['Alive'] for x in ray.nodes()) < {n} and time.time() < t: time.sleep(0.5)\n"
                f"sys.exit(0 if sum(x['Alive'] for x in ray.nodes()) >= {n} else 1)\n")
        proc = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                              timeout=timeout + 60)
        assert proc.returncode == 0, f"the cluster never had {n} nodes: {proc.stderr[-2000:]}"

    def stop(self) -> None:
        stop_nodes(self.nodes)
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # the nodes' logs and sockets
