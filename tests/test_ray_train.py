"""Ray Train (:mod:`smile_ray.orchestration.ray_train`): data-parallel SMILE over real
TorchTrainer workers (gloo on CPU).

The killed-worker run is on the session's local Ray; ``train --workers 2`` starts its
own, as a user's command does. Each TorchTrainer launch costs about 12 s here.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

from conftest import FEW_IL_PAIRS, own_processes_named

from smile_ray.config import make_config
from smile_ray.orchestration.ray_train import train_distributed
from smile_ray.recipe import train

CONFIG = {"steps": 60, "eval_every": 20, "samples_per_class": 5, "batch_size": 48, **FEW_IL_PAIRS}


def _registered_checkpoint_step(out):
    """Step of the latest checkpoint Ray Train's controller has registered (0 if none).

    Workers' reports reach the controller at its polls (every 2 s), so a checkpoint a
    worker has written is not yet one the controller would restart from."""
    for snapshot in (out / "ray").glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):
            continue
        if latest:
            return latest["metrics"]["step"]
    return 0


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(ray_local, tmp_path, cache_dir):
    cfg = make_config({**CONFIG, "steps": 200, "eval_every": 25, "batch_size": 16})
    out = tmp_path / "ft"
    result = {}

    def run():
        try:
            result["metrics"] = train_distributed(cfg, out, workers=2, cache_dir=cache_dir, max_failures=1)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 240
    killed = None
    while time.time() < deadline and thread.is_alive() and killed is None:
        if _registered_checkpoint_step(out) > 0:  # the controller holds a checkpoint: kill a worker
            pids = own_processes_named("RayTrainWorker")  # the workers of this test's own Ray
            if pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=400)
    assert killed is not None, "no worker to kill"
    assert "error" not in result, result.get("error")
    m = result["metrics"]
    assert m["steps"] == 200
    assert m["resumed_from"] and 0 < m["resumed_from"][0] < 200  # from a checkpoint, not from step 0
    assert [h["step"] for h in m["history"]] == list(range(25, 201, 25))


def test_two_workers_from_the_command_line_match_one_process_and_the_terminal_is_clean(tmp_path, cache_dir):
    """``train --workers 2``, a command that starts its own Ray: the run matches one
    process (the same metrics.json schema and more, ranks consistent, every evaluation,
    the files a local run leaves), and a person sees one line per evaluation (Ray Train
    patches print in its workers to log it a second time), none of Ray Train's INFO
    lines, and no preemption-watcher error line for a run that worked."""
    cfg = make_config(CONFIG)
    local = train(cfg, tmp_path / "local", cache_dir=cache_dir)
    sets = [arg for key, value in CONFIG.items() for arg in ("--set", f"{key}={value}")]
    proc = subprocess.run(
        [sys.executable, "-m", "smile_ray", "train", "--workers", "2", "--output", str(tmp_path / "dist"),
         "--cache-dir", str(cache_dir), *sets],
        capture_output=True, text=True, timeout=400, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert [err.count(f"step {s}/60") for s in (20, 40, 60)] == [1, 1, 1], err
    for noise in ("PreemptionWatcher", "Traceback", "Reporting training result", "FutureWarning"):
        assert noise not in err, err
    dist = json.loads((tmp_path / "dist" / "metrics.json").read_text())
    assert set(local) <= set(dist)  # the same schema as a local run, and more
    assert dist["workers"] == 2 and dist["steps"] == 60 and dist["config"] == cfg.to_dict()
    assert dist["ranks_consistent"] is True  # student and mean teacher identical on all ranks
    assert [h["step"] for h in dist["history"]] == [20, 40, 60]
    assert abs(dist["test_acc"] - local["test_acc"]) < 0.08
    assert dist["test_acc"] > 0.5
    assert (tmp_path / "dist" / "model.pt").is_file() and (tmp_path / "dist" / "checkpoint" / "state.pt").is_file()
