"""The scaffold every study shares (``tune``, ``ablate``, ``compare``): its output folder
and state file, ``--resume`` or the refusal of a used folder, the study's storage, the
Ray cluster, the MLflow parent run and how that run ends.

A study's life, in the order :class:`StudyRun` keeps for all three commands:

1. ``StudyRun(...)``: with ``resume``, the saved state file (the settings the study
   started with, its storage, tracking URI, experiment and parent run) or a one-line
   refusal when there is nothing to resume; without it, a refusal when the folder
   already holds this kind of study. The command then validates its own inputs (with
   the saved settings on a resume): nothing is created before everything is checked.
2. :meth:`StudyRun.start`: the output folder is writable, the address answers (before
   the tracking store, which a sqlite URI creates), the storage is reachable (and, for a
   new study, empty), MLflow answers, Ray is up, a trial's resources fit a node, the
   source model is pre-trained once (before trials race for it).
3. :meth:`StudyRun.open_parent`: a new parent run with the study's tags and params, or
   the saved one reopened; :meth:`StudyRun.save` writes the state file with what every
   study records (tracking URI, experiment, parent run, MLflow link, storage).
4. :meth:`StudyRun.trials` runs a Tune experiment (:func:`~smile_ray.orchestration.runner.run_trials`);
   the command writes its tables inside :meth:`StudyRun.closing` and ends with
   :meth:`StudyRun.finish` (FINISHED) or :meth:`StudyRun.fail` (FAILED). An interrupt
   leaves the parent KILLED, an error FAILED: never RUNNING.

Each command keeps only its own logic: the search (``tune``), the arms and rounds
(``ablate``), the methods and columns (``compare``).
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from mlflow.entities import Metric

from smile_ray.checkpoint import check_writable, write_json
from smile_ray.config import Config, find_shipped
from smile_ray.errors import SmileError
from smile_ray.orchestration import storage as storage_
from smile_ray.orchestration import tracking
from smile_ray.orchestration.cluster import alive_nodes, check_address, check_fits, connect
from smile_ray.orchestration.runner import EXPERIMENT_DIR, can_resume, run_trials
from smile_ray.orchestration.spaces import Resources
from smile_ray.orchestration.trainable import TrialSetup
from smile_ray.pretrain import load_source


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def saved_file(saved: str, digest: str | None, given: str | Path | None, flag: str, kind: str) -> str:
    """For ``--resume``: the file a study started with. Its path was saved resolved (a
    shipped name like ``smile`` as the shipped file it named), with its content's digest:
    a resumed study must draw from the file its first trials drew from. ``given`` (the
    flag repeated on the resume command) must name that same file."""
    path = Path(saved)
    if given is not None and find_shipped(given, kind).resolve() != path:
        raise SmileError(f"--resume continues with the saved {flag} {path}; drop {flag} {given}")
    if not path.is_file():
        raise SmileError(f"--resume: {path} ({flag} of the study) is gone; restore it to continue")
    if digest and file_digest(path) != digest:
        raise SmileError(f"--resume: {path} ({flag} of the study) changed since the study started; "
                         "restore it to continue, or start a new study in another --output")
    return str(path)


def check_cluster(store: str | None, resources: Resources | None = None, address: str | None = None) -> None:
    """After connecting: a cluster of several nodes needs ``--storage``, and some node
    (or node type of its autoscaler) must hold a trial's ``resources``
    (:func:`~smile_ray.orchestration.cluster.check_fits`)."""
    storage_.require_for_cluster(store, alive_nodes())
    if resources is not None:
        check_fits(resources.bundles(), "each trial (resources: " + ", ".join(
            f"{k.removeprefix('resources_')}: {v:g}" for k, v in resources.summary().items()) + ")",
            started_here=address is None)


def prepare_sources(configs: Iterable[Config], cache_dir: str | Path | None) -> None:
    """Find (or pre-train, once) the source model of each distinct source among
    ``configs``; a config whose weights cannot be had is its one-line error."""
    prepared = set()
    for config in configs:
        key = (config.dataset, config.backbone, config.weights, config.image_size, config.data_root)
        if key not in prepared:
            prepared.add(key)
            load_source(config, cache_dir)


class StudyRun:
    """One study in its output folder, from its state file to its parent run's end.

    ``kind`` names it in messages (``study``, ``ablation``, ``comparison``) and is the
    parent run's ``kind`` tag; ``state_name`` is its state file in the output folder;
    ``holds`` the files whose presence means the folder already holds such a study.
    ``storage`` (``--storage``) is where the trials keep their files on a cluster of
    several nodes; ``root`` names the study's storage folder outright (a tuning study
    inside an ablation or comparison: their own storage's ``tuning/<name>``)."""

    def __init__(self, output_dir: str | Path, *, kind: str, state_name: str, holds: tuple[str, ...],
                 resume: bool = False, address: str | None = None, tracking_uri: str | None = None,
                 experiment: str | None = None, cache_dir: str | Path | None = None, storage: str | None = None,
                 root: str | None = None, verbose: int = 1):
        self.given, self.out = output_dir, Path(output_dir).resolve()
        self.kind, self.state_file, self.resume = kind, self.out / state_name, resume
        self.address, self.verbose = address, verbose
        self.cache_dir = str(cache_dir) if cache_dir else None
        self.saved: dict[str, Any] = {}
        if resume:  # the study continues with the settings it was started with
            saved = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
            if not saved or not can_resume(saved.get("storage_root") or self.out):
                raise SmileError(f"--resume: {self.out} holds no {kind} to resume")
            self.saved = saved
            tracking_uri, experiment = saved["tracking_uri"], saved["experiment"]
            storage, root = saved.get("storage"), saved.get("storage_root")
        elif any((self.out / f).exists() for f in holds):
            article = "an" if kind[0] in "aeiou" else "a"
            raise SmileError(f"{self.out} already holds {article} {kind}; use --resume, or another --output")
        self.storage, self._root, self._uri, self._experiment = storage, root, tracking_uri, experiment
        self.state: dict[str, Any] = dict(saved) if resume else {}
        self.parent_id: str | None = None
        self.study_logger: tracking.StudyLogger | None = None  # the latest experiment's (see trials)

    def start(self, base: Config, resources: Resources, sources: Iterable[Config] | None = None) -> None:
        """Once the command has validated its inputs: check and connect everything the
        study needs, in the order that creates nothing before the last check. The source
        models of ``sources`` (default: the base alone; a comparison's columns may each
        set their own ``weights``) are found, or pre-trained once here rather than by
        every trial at once."""
        check_writable(self.out, given=self.given)
        check_address(self.address)  # before the tracking store, which a sqlite URI creates
        nested = self._root is not None and not self.resume  # a tuning study inside an ablation or comparison
        self.root = self._root or (storage_.study_root(self.storage, self.out) if self.storage else str(self.out))
        if self.storage and not nested:
            storage_.check_storage(self.storage, self.root, fresh=not self.resume)
        self.uri = self._uri or tracking.default_tracking_uri()
        self.client = tracking.connect(self.uri)
        self.experiment = self._experiment or f"smile-ray-{base.dataset}"
        connect(self.address)
        check_cluster(self.storage or (self.root if self.root != str(self.out) else None), resources, self.address)
        prepare_sources(sources if sources is not None else [base], self.cache_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.experiment_id = tracking.experiment_id(self.client, self.experiment, self.uri)

    def open_parent(self, tags: dict[str, str], params: dict[str, Any]) -> str:
        """The study's MLflow parent run: made with ``tags`` and ``params``, or on a
        resume the saved one, reopened (its params are the first start's)."""
        if self.resume:
            self.parent_id = self.saved["parent_run_id"]
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            self.parent_id = self.client.create_run(self.experiment_id, run_name=self.out.name, tags={
                "study": self.out.name, "kind": self.kind, **tags, **tracking.code_version()}).info.run_id
            self.client.log_batch(self.parent_id, params=tracking.flat_params(params))
        return self.parent_id

    def save(self, state: dict[str, Any]) -> None:
        """Write the state file: the command's ``state`` (what ``--resume`` needs to
        rebuild it) over the saved one, with what every study records."""
        self.state = {**self.state, **state, "tracking_uri": self.uri, "experiment": self.experiment,
                      "parent_run_id": self.parent_id, "address": self.address, "storage": self.storage,
                      "storage_root": self.root,
                      "mlflow_ui": tracking.ui_link(self.uri, self.experiment_id, self.parent_id)}
        write_json(self.state, self.state_file)

    def setup(self, resources: Resources, **kw: Any) -> TrialSetup:
        return TrialSetup(resources, cache_dir=self.cache_dir, **kw)

    def trials(self, setup: TrialSetup, param_space: dict[str, Any], *, expected: int,
               experiment_dir: str = EXPERIMENT_DIR, resume: bool | None = None, **kw: Any):
        """Run (or resume) one Tune experiment of this study; its trials' child runs hang
        under the parent, logged by :attr:`study_logger`. Returns Tune's ResultGrid (see
        ``run_trials``)."""
        self.study_logger = tracking.StudyLogger(self.uri, self.experiment_id, self.parent_id, self.out.name, setup)
        return run_trials(self.out, setup, param_space, self.study_logger, root=self.root,
                          resume=self.resume if resume is None else resume, experiment_dir=experiment_dir,
                          expected=expected, **kw)

    @contextmanager
    def closing(self) -> Iterator[None]:
        """Around a study's work after its trials (tables, plots, artifacts): an interrupt
        marks the parent and any open child KILLED, an error FAILED, so that no run is left
        RUNNING whenever the Ctrl-C comes."""
        try:
            yield
        except KeyboardInterrupt:
            self._end("KILLED")
            raise
        except BaseException:
            self._end("FAILED")
            raise

    def _end(self, status: str) -> None:
        if self.study_logger is not None:
            self.study_logger.close_open_runs(status)
        self.client.set_terminated(self.parent_id, status=status)

    def fail(self, message: str) -> SmileError:
        """Mark the parent (and any open child) FAILED; the error to raise."""
        self._end("FAILED")
        return SmileError(message)

    def finish(self, artifacts: list[Path], metrics: dict[str, float] | None = None) -> None:
        """Log the study's files and numbers on the parent run and mark it FINISHED."""
        for f in artifacts:
            self.client.log_artifact(self.parent_id, str(f))
        if metrics:
            now = int(time.time() * 1000)
            self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        if self.study_logger is not None:
            self.study_logger.close_open_runs("FAILED")  # a child still open now never finished
        self.client.set_terminated(self.parent_id, status="FINISHED")
