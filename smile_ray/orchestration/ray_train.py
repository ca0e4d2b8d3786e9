"""Ray Train: the core training recipe, data-parallel over N workers.

Each worker runs :func:`smile_ray.recipe.train` unchanged; Ray enters only through the
hooks the recipe offers:

* ``rank``/``world_size`` -- worker r trains on the r-th contiguous shard of every global
  batch (``batch_size`` is the global batch and must divide evenly), so the workers
  together see exactly the single-process batch. All workers share the step's lambda
  (it is keyed by seed and step); each draws its own mixing permutation inside its shard.
  Losses over the batch are the single-process losses of the global batch (SMILE's
  feature norm is summed over ranks; see :mod:`smile_ray.methods.smile`).
* ``prepare_model`` -- :func:`ray.train.torch.prepare_model` wraps the student in
  DistributedDataParallel (gloo on CPU, nccl on GPU). DDP keeps the student identical on
  every rank, and the mean teacher, an EMA of identical parameters, stays identical too
  (checked at the end of every run: ``ranks_consistent`` in metrics.json).
* ``on_eval`` -- :func:`ray.train.report` of rank 0's metrics at every evaluation, with
  the newest checkpoint whose background write has finished (that of an earlier step,
  ``checkpoint_step`` in the record; the last evaluation's is its own). Evaluation runs
  on rank 0 alone, on rank 0's weights, so the reported metric is the single-process
  metric of those weights.
* ``on_end`` -- a last report whose checkpoint holds the run's files (metrics.json,
  model.pt, the final checkpoint), which the driver copies to the output directory.

Inside a Ray Tune trial, :class:`ray.tune.integration.ray_train.TuneReportCallback`
forwards every one of these reports to Tune, so ASHA and MLflow see the same curve as
for an in-process trial.

Fault tolerance: with ``max_failures`` > 0 a dead worker is replaced and every worker
restarts from the latest reported checkpoint (``ray.train.get_checkpoint``), not from
step 0; ``resumed_from`` in metrics.json lists the steps it restarted from.

Several nodes: Ray Train's ``storage_path`` must be reachable from every node (``--storage``,
:mod:`smile_ray.orchestration.storage`); without one a cluster of more than one node is
refused before anything starts. The run's files come home to ``output_dir`` on the driver
through the last report's checkpoint, and a resumed run's checkpoint travels to the
workers through Ray's object store, so no worker reads the driver's disk. Devices: a
worker trains on the GPU Ray assigned it, and fails in one line naming its node where
it was given one that CUDA cannot use.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch

from smile_ray.checkpoint import CHECKPOINT_FILE, check_same_config, read_checkpoint, write_json
from smile_ray.config import Config, make_config
from smile_ray.errors import SmileError
from smile_ray.methods import method_class
from smile_ray.orchestration.cluster import alive_nodes, assigned_device, cluster_cpus, connect, user_error
from smile_ray.orchestration.storage import check_storage, require_for_cluster
from smile_ray.pretrain import load_source
from smile_ray.recipe import train

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default), and it sees a worker's last report, the end of its loop and the group's
# shutdown only at a poll: 2 s costs about 5 s of every run's end (benchmarks/
# ray_overhead.py). A poll is one small call per worker, so 0.25 s stays cheap on a large
# cluster; a value in the environment wins. (The driver's value reaches the controller.)
POLL_INTERVAL_ENV, POLL_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


def scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers and names of a run's metrics (no history, config or lists), and its
    reliability bins as one JSON string, from which the driver draws the run's
    reliability diagram for MLflow (:class:`~smile_ray.orchestration.tracking.StudyLogger`)."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    if "reliability" in metrics:
        out["reliability"] = json.dumps(metrics["reliability"])
    return out


def say(line: str) -> None:
    """A line on the worker's stderr, which Ray forwards to the driver's terminal. Not
    ``print``: Ray Train patches ``print`` in its workers to also log through the root
    logger, which prints the line a second time."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def worker_loop(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    # Ray Train's worker logs its every report at INFO through a logger named by a file
    # path, outside ``ray.train`` and so past RunConfig's logging_config: keep the
    # worker's root logger to warnings (its files under the Ray session keep everything).
    logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    config = make_config(loop_config["config"])
    # Rank 0 writes the run's files in a scratch directory of its own node; they reach
    # the driver as the last report's checkpoint.
    work = Path(tempfile.mkdtemp(prefix="smile-ray-worker-")) if rank == 0 else None

    def on_eval(record: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if rank == 0 and loop_config.get("progress"):
            say(f"step {record['step']}/{config.steps}  loss {record['train_loss']:.4f}  "
                f"val_acc {record['val_acc']:.4f}")
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(record, checkpoint=checkpoint)

    def on_end(metrics: dict[str, Any]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(work) if work is not None else None
        step = metrics["steps"] if "steps" in metrics else metrics["step"]  # rank 0 has every metric, others the step
        ray.train.report({**scalars(metrics), "step": step}, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    device = assigned_device(config.device)
    if device.type == "cuda":
        device = ray.train.torch.get_device()  # the node's Train workers share the visible GPUs: this one's
    initial = None
    if loop_config.get("initial_checkpoint") is not None and checkpoint is None:
        # the driver's checkpoint to resume from, sent through the object store (this
        # worker may be on a node that cannot read the driver's disk)
        initial = tempfile.mkdtemp(prefix="smile-ray-resume-")
        (Path(initial) / CHECKPOINT_FILE).write_bytes(ray.get(loop_config["initial_checkpoint"]))
    try:
        with checkpoint.as_directory() if checkpoint else nullcontext(initial) as resume_dir:
            train(
                config,
                work,
                cache_dir=loop_config.get("cache_dir"),
                resume_from=resume_dir,
                on_eval=on_eval,
                on_end=on_end,
                rank=rank,
                world_size=world_size,
                device=device,
                prepare_model=partial(
                    ray.train.torch.prepare_model,
                    move_to_device=False,
                    parallel_strategy_kwargs={
                        "find_unused_parameters": method_class(config.method).may_skip_parameters(config)},
                ),
                log=lambda msg: say(f"[rank {rank}] {msg}"),
            )
    finally:
        for scratch in (work, initial):
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)


def default_cpus_per_worker(workers: int, use_gpu: bool) -> float:
    """On CPU, share the cluster's CPUs among the workers (Ray sets each worker's torch
    threads to its CPU count, so one worker alone would otherwise run single-threaded)."""
    if use_gpu:
        return 1
    return max(1, cluster_cpus() // workers)


def train_distributed(
    config: Config,
    output_dir: str | Path,
    *,
    workers: int,
    use_gpu: bool = False,
    address: str | None = None,
    max_failures: int = 1,
    cache_dir: str | Path | None = None,
    storage_path: str | None = None,
    progress: bool = False,
    cpus_per_worker: float | None = None,
    report_to_tune: bool = False,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run ``config`` on ``workers`` Ray Train workers; writes ``output_dir`` like a local run.

    A ``output_dir`` that holds a checkpoint of the same config is resumed (unless
    ``fresh``: then it is replaced once the new run writes its first one). With
    ``report_to_tune`` (inside a Tune trial) every report also goes to Tune.
    ``storage_path`` is Ray Train's (``--storage``; default ``output_dir/ray``, which
    only one node can reach).
    """
    if workers < 1:
        raise SmileError(f"--workers={workers}: need at least one worker")
    if config.batch_size % workers:
        raise SmileError(f"batch_size={config.batch_size} does not split evenly over {workers} workers")
    out = Path(output_dir).resolve()
    initial = out / "checkpoint"
    resume = not fresh and (initial / CHECKPOINT_FILE).is_file()
    if resume:  # refuse a corrupt or foreign one before starting Ray
        check_same_config(read_checkpoint(initial / CHECKPOINT_FILE), config, initial / CHECKPOINT_FILE)
    if storage_path and not report_to_tune:
        check_storage(storage_path)
    connect(address)
    if not storage_path:
        require_for_cluster(None, alive_nodes())
    if config.weights == "source" and not address:
        load_source(config, cache_dir)  # pre-train once here, not once per worker
    callbacks = []
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)
    started = time.perf_counter()
    trainer = ray.train.torch.TorchTrainer(
        worker_loop,
        train_loop_config={
            "config": config.to_dict(),
            "cache_dir": str(cache_dir) if cache_dir else None,
            "initial_checkpoint": ray.put((initial / CHECKPOINT_FILE).read_bytes()) if resume else None,
            "progress": progress,
        },
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker or default_cpus_per_worker(workers, use_gpu)},
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{int(time.time())}",
            storage_path=storage_path or str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            # Train's own INFO lines (every report, every worker-group step) and its
            # transient warnings stay in the session's log files, off the terminal.
            logging_config=ray.train.LoggingConfig(log_level="ERROR"),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; surface the user's own error as one line
        cause = user_error(e)
        if cause is not None:
            raise cause from None
        raise
    if result.checkpoint is None:
        raise SmileError("Ray Train finished without a checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as final:
        final = Path(final)
        metrics = json.loads((final / "metrics.json").read_text())
        metrics["wall_seconds"] = time.perf_counter() - started
        shutil.copy2(final / "model.pt", out / "model.pt")
        tmp = out / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shutil.copy2(final / "checkpoint" / CHECKPOINT_FILE, tmp / CHECKPOINT_FILE)
        shutil.rmtree(initial, ignore_errors=True)
        tmp.rename(initial)
    write_json(metrics, out / "metrics.json")
    return metrics
