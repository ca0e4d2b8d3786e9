"""One Ray Tune trial = one core run, in the trial's process or on Ray Train workers.

Both kinds report to Tune at every evaluation (metrics and checkpoint) and once more at
the end with the test metrics, so ASHA can stop either early and MLflow gets the same
curve for both. A trial's config is the study's base with the trial's parameters, or
run number ``params["run"]`` of a list of full configs (an ablation's runs).

Replicates (a space file's ``replicates: K``): the trial runs its config on K seeds
(``seed``, ``seed + 1``, ...: K training draws and initialisations), each as a Ray task
in its own process holding the trial's ``resources``, so they run side by side where the
cluster has room. The trial itself only collects: at every evaluation step that all K
have reached it reports the mean of their metrics (what ASHA and MLflow see), the
spread (``<key>_std``) and each seed's value (``<key>_r<i>``); at the end, the mean test
metrics likewise. Replicate ``i``'s files are in ``run/replicate-<i>``; replicate 0 is
exactly ``smile-ray train`` on the trial's config. Deviation from single-seed trials: a
replicated trial reports no Tune checkpoint, so a resumed study restarts an unfinished
replicated trial from its first step.

Where files go: a run's folder is ``<experiment>/<trial>/run`` in the study's storage
(:mod:`smile_ray.orchestration.storage`): written in place on one machine or a shared
disk, written on the trial's node and uploaded at its end when the storage is a URI.

Devices: inside Ray ``device=auto`` means the GPUs Ray assigned to the trial, replicate
or worker (:func:`~smile_ray.orchestration.cluster.assigned_device`): a ``gpus: 0`` trial
trains on the CPU even on a GPU node.
"""
from __future__ import annotations

import dataclasses
import statistics
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

import ray
from ray import tune

from smile_ray.config import make_config
from smile_ray.interrupts import resend_lost_exits
from smile_ray.orchestration.cluster import assigned_device
from smile_ray.orchestration.ray_train import scalars, train_distributed
from smile_ray.orchestration.storage import join, staged
from smile_ray.orchestration.spaces import Resources
from smile_ray.recipe import train

TRIAL_DRIVER_CPU = 0.01  # a trial that launches a TorchTrainer holds (almost) no CPU itself
RUN_DIR = "run"  # a trial's run directory (metrics.json, model.pt) inside its trial directory


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one Tune experiment shares, and how a trial's parameters
    become its config: a tuning study's trials are ``base`` with the searched values
    (``params`` = ``{key: value}``), an ablation's or comparison's are run number
    ``params["run"]`` of ``runs`` (each ``{"config": full config, "tags": {...}}``). The
    trainable and the MLflow logger both ask :meth:`config_for`, so a child run's params
    are the config its trial trained."""

    resources: Resources
    cache_dir: str | None = None
    base: dict[str, Any] | None = None
    runs: list[dict[str, Any]] | None = None
    replicates: int = 1
    experiment_path: str = ""  # the Tune experiment's folder in the study's storage, set by run_trials

    def config_for(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.runs is not None and "run" in params:
            return self.runs[params["run"]]["config"]
        return {**(self.base or {}), **params}

    def tags_for(self, params: dict[str, Any]) -> dict[str, str]:
        """The run's tags (an ablation's arm and seed, a comparison's method, column and seed)."""
        if self.runs is not None and "run" in params:
            return {k: str(v) for k, v in self.runs[params["run"]]["tags"].items()}
        return {}

    def at(self, experiment_path: str) -> "TrialSetup":
        return dataclasses.replace(self, experiment_path=experiment_path)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable."""
    resend_lost_exits()  # this trial's worker process: its SIGTERM is an exit, never a printed traceback
    config = make_config(setup.config_for(params))
    res = setup.resources
    # The trial's run folder in the experiment's storage, written through staged(): not
    # get_trial_dir(), a local working directory that Ray copies to storage only for a
    # fresh actor on the driver's node (a reused actor's, or another node's, would be lost).
    location = join(setup.experiment_path, Path(tune.get_context().get_trial_dir()).name, RUN_DIR)
    if setup.replicates > 1:
        run_replicates(config.to_dict(), setup.replicates, location, res, setup.cache_dir)
        return
    if res.workers > 1:
        with staged(location) as out:
            train_distributed(config, out, workers=res.workers, use_gpu=res.gpus > 0,
                              cpus_per_worker=(res.cpus - TRIAL_DRIVER_CPU) / res.workers,
                              cache_dir=setup.cache_dir, storage_path=join(location, "ray"), report_to_tune=True)
        return
    device = assigned_device(config.device)

    def on_eval(record: dict[str, Any], checkpoint_dir: Path | None) -> None:
        # no checkpoint at an evaluation between two checkpoint steps (checkpoint_every)
        tune.report(record, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    def on_end(metrics: dict[str, Any]) -> None:
        tune.report({**scalars(metrics), "step": metrics["steps"]})

    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume_dir, staged(location) as out:
        train(config, out, cache_dir=setup.cache_dir, resume_from=resume_dir, on_eval=on_eval, on_end=on_end,
              device=device, log=lambda msg: None)


def _replicate(config: dict[str, Any], location: str, cache_dir: str | None, queue, index: int) -> None:
    """One seed of a replicated trial (a Ray task): its evaluations and end go to ``queue``."""
    def on_eval(record: dict[str, Any], checkpoint_dir: Path | None) -> None:
        queue.put((index, "eval", record))

    def on_end(metrics: dict[str, Any]) -> None:
        queue.put((index, "end", {**scalars(metrics), "step": metrics["steps"]}))

    config = make_config(config)
    device = assigned_device(config.device)
    with staged(location) as out:
        train(config, out, cache_dir=cache_dir, on_eval=on_eval, on_end=on_end, device=device, log=lambda msg: None)


SPREAD_KEYS = ("train_loss", "val_acc", "val_ece", "test_acc", "test_ece")  # kept per seed, with their spread


def combine(records: list[dict[str, Any]]) -> dict[str, Any]:
    """K replicates' records at one step -> the mean of every number, and for
    :data:`SPREAD_KEYS` also ``<key>_std`` and each seed's ``<key>_r<i>``; other values (a
    reliability string) from replicate 0."""
    out: dict[str, Any] = {}
    for key, first in records[0].items():
        values = [r.get(key) for r in records]
        if key == "step" or isinstance(first, bool) or not all(isinstance(v, (int, float)) for v in values):
            out[key] = first
            continue
        out[key] = statistics.fmean(values)
        if key not in SPREAD_KEYS:
            continue
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.update({f"{key}_r{i}": v for i, v in enumerate(values)})
    return out


def run_replicates(config: dict[str, Any], k: int, location: str, res: Resources, cache_dir: str | None) -> None:
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # Outside the trial's placement group (which holds only the driver's sliver of CPU):
    # the seeds queue for the cluster's CPUs and GPUs like any task, so K of them run side
    # by side where there is room and one after another where there is not.
    anywhere = PlacementGroupSchedulingStrategy(placement_group=None)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": anywhere})
    # Each seed holds the trial's CPUs less the driver's sliver (as a TorchTrainer's workers
    # do), so that two trials' seeds fit side by side on a 2-CPU machine.
    task = ray.remote(_replicate).options(num_cpus=res.cpus - TRIAL_DRIVER_CPU, num_gpus=res.gpus, max_retries=0,
                                          scheduling_strategy=anywhere)
    refs = [task.remote({**config, "seed": config["seed"] + i}, join(location, f"replicate-{i}"), cache_dir, queue, i)
            for i in range(k)]
    evals: dict[int, dict[int, dict[str, Any]]] = {}
    ends: dict[int, dict[str, Any]] = {}
    try:
        while len(ends) < k:
            try:
                index, kind, record = queue.get(timeout=1.0)
            except Empty:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in done:
                    ray.get(ref)  # a failed replicate fails the trial with its error
                if len(done) == k and queue.empty() and len(ends) < k:
                    raise RuntimeError("replicates ended without reporting their results")
                continue
            if kind == "end":
                ends[index] = record
                continue
            at = evals.setdefault(record["step"], {})
            at[index] = record
            if len(at) == k:
                tune.report(combine([at[i] for i in range(k)]))
        tune.report(combine([ends[i] for i in range(k)]))
    finally:  # an early-stopped or failed trial takes its replicates with it
        for ref in refs:
            ray.cancel(ref, force=True)
        ray.kill(queue.actor)


def trainable(setup: TrialSetup):
    """:func:`run_trial` bound to ``setup`` with the resources its trials hold."""
    res = setup.resources
    fn = tune.with_parameters(run_trial, setup=setup)
    if res.workers > 1 or setup.replicates > 1:
        # The trial only drives its TorchTrainer (or its replicates' tasks), which hold the CPUs and GPUs.
        return tune.with_resources(fn, {"cpu": TRIAL_DRIVER_CPU})
    return tune.with_resources(fn, {"cpu": res.cpus, "gpu": res.gpus})
