"""Shared fixtures. The source model is pre-trained once per test session into a
temporary cache (about 50 s alone, on one thread as its recipe fixes); every test reuses
it. It is pre-trained in a background process started with the session, while pytest
collects (about 10 s on the other core) and then runs the modules whose tests need no
source model (:func:`pytest_collection_modifyitems`), so that the suite waits for it as
little as possible.

Tests touch only processes they started: :func:`descendants` finds them by parent pid,
never by name.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from smile_ray.config import make_config
from smile_ray.pretrain import load_source


# Nothing in the tests downloads: a weight tag whose file is not in the (test's own)
# cache is the one-line offline error. Set for the whole process, so Ray's workers that
# the tests start inherit it too.
os.environ["SMILE_RAY_OFFLINE"] = "1"
# Ray's raylets refuse new objects once their disk is 95 % full and print an error line to
# every driver's terminal every 10 s; a CI machine's disk can be that full without the
# tests writing much (they assert what the product prints, one line on a bad input). The
# threshold is the raylets' own setting, read from the environment of every Ray that the
# tests start (in this process, the CLI's subprocesses and `ray start`).
os.environ.setdefault("RAY_local_fs_capacity_threshold", "1")
# torch.compile's caches (inductor's kernels and FX graphs) go to a folder of this
# session's, removed at its end, unless the caller names one. Torch's default,
# /tmp/torchinductor_<user>, is the machine's: a test there would read what an earlier
# session compiled (the compile test took 4-7 s warm and 25 s cold, as on a fresh CI
# machine) and leave gigabytes behind. Set for the whole process, so Ray's workers and
# the commands' subprocesses that the tests start inherit it too.
_INDUCTOR_CACHE = None if "TORCHINDUCTOR_CACHE_DIR" in os.environ else \
    tempfile.mkdtemp(prefix="smile-ray-test-inductor-")
if _INDUCTOR_CACHE is not None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE


#: The interpolation losses, measured once a run ends, on 8 image pairs per split instead
#: of the default 256, which cost more than a short test run's training (40 % of a
#: 20-step digits run, 80 % of a 2-step MobileNet one). Every test run whose subject is
#: neither their value nor their default takes it.
FEW_IL_PAIRS = {"il_pairs": 8}

#: the background pre-training of this session's source model: its folder and process
_PRETRAIN: dict = {}
_PRETRAIN_CODE = ("import sys\nfrom smile_ray.config import make_config\nfrom smile_ray.pretrain import load_source\n"
                  "load_source(make_config(), sys.argv[1], log=lambda msg: None)\n")


def pytest_collection_modifyitems(session, config, items):
    """Run the modules that need neither the source model nor Ray first; then those that
    join a cluster in this process (the ``joins_cluster`` mark: before anything here starts
    a local Ray, after which Ray cannot join a cluster without token authentication); then
    those that need the source model but not this session's Ray; then those that use it
    (each module kept whole, in its order). The source model pre-trains in the background
    meanwhile (:func:`pytest_sessionstart`): the first modules' tests are short and mostly
    single-threaded, so the two share the cores, where a Ray study would take both. The
    session's Ray (:func:`ray_local`) thus starts once, for the last group, and no other
    Ray of the suite (a cluster's nodes, a command's own) runs beside it."""
    group: dict = {}
    first: dict = {}
    for i, item in enumerate(items):
        uses = set(item.fixturenames)
        if uses & {"ray_local", "ray_address"}:
            rank = 3
        elif item.get_closest_marker("joins_cluster"):
            rank = 1
        else:
            rank = 2 if "cache_dir" in uses else 0
        group[item.path] = max(group.get(item.path, 0), rank)
        first.setdefault(item.path, i)
    items.sort(key=lambda item: (group[item.path], first[item.path]))
    if not any("cache_dir" in item.fixturenames for item in items):
        _stop_pretraining()  # started with the session; nothing collected needs it


def pytest_sessionstart(session):
    if not os.environ.get("SMILE_RAY_TEST_CACHE") and not session.config.option.collectonly:
        path = Path(tempfile.mkdtemp(prefix="smile-ray-test-cache-"))
        log = open(path / "pretrain.log", "w")
        env = {**os.environ, "SMILE_RAY_CACHE": str(path / "user-cache")}
        _PRETRAIN.update(path=path, log=log, proc=subprocess.Popen(
            [sys.executable, "-c", _PRETRAIN_CODE, str(path)], env=env, stdout=log, stderr=subprocess.STDOUT))


def _stop_pretraining() -> None:
    proc = _PRETRAIN.pop("proc", None)
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        _PRETRAIN["log"].close()
        shutil.rmtree(_PRETRAIN["path"], ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    _stop_pretraining()
    if _INDUCTOR_CACHE is not None:
        shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    # SMILE_RAY_TEST_CACHE: a folder kept between test sessions (a developer re-running a
    # few tests skips the pre-training); CI leaves it unset and pre-trains afresh
    kept = os.environ.get("SMILE_RAY_TEST_CACHE")
    if kept:
        path = Path(kept)
    elif "proc" in _PRETRAIN:
        path = _PRETRAIN["path"]
        if _PRETRAIN["proc"].wait() != 0:
            pytest.fail("pre-training the source model failed:\n" + (path / "pretrain.log").read_text())
    else:
        path = tmp_path_factory.mktemp("cache")
    load_source(make_config(), path, log=lambda msg: None)  # pre-trained: reads it; else pre-trains here
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path_factory):
    # Nothing in the tests may write to the user's real cache.
    monkeypatch.setenv("SMILE_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "user-cache"))


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # MLflow creates and migrates its schema
    return path


@pytest.fixture
def mlflow_db(tmp_path, _mlflow_template) -> Path:
    """``tmp_path/mlflow.db``, the store a study run in ``tmp_path`` opens by default,
    already made: a copy of an empty store MLflow made once per session. Making one runs
    MLflow's schema migrations (about 3 s), which every study test would pay again; the
    tests that do not take this fixture still have the product make its own."""
    path = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_template, path)
    return path


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray, started once for the session by the product's own start-up code, for
    the modules that run last (:func:`pytest_collection_modifyitems`); each module started
    its own before, which cost 4-6 s a module for what is the same local Ray."""
    import ray

    from smile_ray.orchestration.cluster import connect

    connect()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The address of the session's local Ray, for the ``smile-ray`` subprocesses a test
    starts: given as their ``--address``, they join it as drivers of their own instead of
    each starting (and stopping) a Ray, which is most of a short study's time. For tests
    whose subject is not Ray's start-up: a command that starts its own Ray is still run
    by test_ray_train.py's ``train --workers 2`` test, and test_tune.py::test_bad_command_lines checks
    an unreachable --address."""
    import ray

    return ray.get_runtime_context().gcs_address


def descendants(pid: int) -> list[int]:
    """The pids of every living process below ``pid`` in the process tree."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], list(children.get(pid, []))
    while stack:
        p = stack.pop()
        found.append(p)
        stack.extend(children.get(p, []))
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
    except OSError:
        return ""


def own_processes_named(word: str) -> list[int]:
    """Processes this test process started (directly or not) whose command line holds ``word``."""
    return [p for p in descendants(os.getpid()) if word in command_line(p)]


def interrupt_after_rows(proc, row_pattern: str, rows: int, timeout: float = 240.0,
                         last_batch: bool = False) -> tuple[str, list[Path]]:
    """Read ``proc``'s stderr as it comes; once ``rows`` lines of the live table match
    ``row_pattern`` (a row is printed when Tune has recorded that trial's end), note the
    run directories' metrics.json files, send SIGINT and return (all of stderr, those
    files). Waiting for the rows, not for the files, matters: a run writes metrics.json a
    moment before Tune hears of its end, and a run Tune has not seen end is resumed.

    ``last_batch``: also wait until one more run than ``rows`` has reported an evaluation
    (Tune's ``result.json``), so the Ctrl-C comes while that run trains: with ``rows`` one
    less than the study's runs, no run is left waiting."""
    import re
    import signal
    import threading
    import time

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while (sum(bool(re.match(row_pattern, ln)) for ln in list(lines)) < rows and proc.poll() is None
           and time.time() < deadline):
        time.sleep(0.2)
    assert proc.poll() is None, "".join(lines)
    assert sum(bool(re.match(row_pattern, ln)) for ln in list(lines)) >= rows, "".join(lines)
    out = Path(proc.args[proc.args.index("--output") + 1])
    while (last_batch and proc.poll() is None and time.time() < deadline
           and sum(p.stat().st_size > 0 for p in out.glob("tune/*/result.json")) < rows + 1):
        time.sleep(0.2)
    finished = sorted(out.glob("tune/*/run/metrics.json"))
    if last_batch:
        assert proc.poll() is None and len(finished) == rows, "".join(lines)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    return "".join(lines), finished


def assert_as_uninterrupted(metrics_json: Path, cache_dir: Path, tmp: Path) -> None:
    """The run of ``metrics_json`` (interrupted, then resumed) ends where an uninterrupted
    run of its config ends: the same validation and test numbers, bit for bit."""
    import json

    from smile_ray.recipe import train

    resumed = json.loads(metrics_json.read_text())
    direct = train(make_config(resumed["config"]), tmp, cache_dir=cache_dir)
    for key in ("val_acc", "test_acc", "test_ece", "steps"):
        assert resumed[key] == direct[key], (key, resumed[key], direct[key])
