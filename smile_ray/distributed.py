"""Ray Train: the core training loop, data-parallel over N workers (orchestration layer).

Each worker runs :func:`smile_ray.train.train` unchanged; Ray enters only through the
hooks the core offers:

* ``rank``/``world_size`` -- worker r trains on the r-th contiguous shard of every global
  batch (``batch_size`` is the global batch and must divide evenly), so the workers
  together see exactly the single-process batch. All workers share the step's lambda
  (it is keyed by seed and step); each draws its own mixing permutation inside its shard.
* ``prepare_model`` -- :func:`ray.train.torch.prepare_model` wraps the student in
  DistributedDataParallel (gloo on CPU, nccl on GPU). DDP keeps the student identical on
  every rank, and the mean teacher, an EMA of identical parameters, stays identical too
  (checked at the end of every run: ``ranks_consistent`` in metrics.json).
* ``report`` -- :func:`ray.train.report` with rank 0's checkpoint at every evaluation.
  Evaluation runs on rank 0 alone, on rank 0's weights, so the reported metric is the
  single-process metric of the checkpointed weights.

Fault tolerance: with ``max_failures`` > 0 a dead worker is replaced and every worker
restarts from the latest reported checkpoint (``ray.train.get_checkpoint``), not from
step 0; ``resumed_from`` in metrics.json lists the steps it restarted from.

Deviation under data parallelism: the feature-mixup loss is the unsquared Frobenius
norm of each worker's shard (the reference takes it over the whole batch), so its scale
depends on the per-worker batch.
"""
from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch

from smile_ray.config import Config, make_config
from smile_ray.errors import SmileError
from smile_ray.pretrain import load_source
from smile_ray.train import CHECKPOINT_FILE, atomic_write_json, check_same_config, read_checkpoint, train


def connect(address: str | None = None) -> None:
    """Start a local Ray (no address) or join an existing cluster (``auto``, ``host:port``,
    ``ray://host:port``); an unreachable address is a one-line SmileError."""
    if address and address != "auto":
        _probe(address)
    if ray.is_initialized():
        return
    try:
        # Workers' own lines (progress, errors) reach this terminal; Ray's log chatter does
        # not (without a dashboard, Train's placement-group cleaner warns every few seconds).
        quiet = ray.LoggingConfig(log_level="ERROR")
        if address:
            ray.init(address=address, logging_level="ERROR", logging_config=quiet)
        else:
            ray.init(logging_level="ERROR", logging_config=quiet)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise SmileError(f"cannot reach a Ray cluster at --address {address!r}: {detail}") from None


def _probe(address: str) -> None:
    """Fail fast on an unreachable head: ray.init itself retries for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise SmileError(f"--address {address!r}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise SmileError(f"cannot reach a Ray cluster at --address {address!r}: {e.strerror or e}") from None


def find_unused_parameters(config: Config) -> bool:
    """DDP must search for parameters without gradient only when the source-label head
    can sit out a step: in SMILE's plain tail with no head L2 to reach it."""
    return config.method == "smile" and config.source_label and config.plain_tail and not config.head_l2


def worker_loop(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    config = make_config(loop_config["config"])

    def report(metrics: dict[str, Any], checkpoint_dir: str) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if rank == 0 else None
        if rank == 0 and loop_config.get("progress") and "val_acc" in metrics:
            print(f"step {metrics['step']}/{config.steps}  loss {metrics['train_loss']:.4f}  "
                  f"val_acc {metrics['val_acc']:.4f}", file=sys.stderr, flush=True)
        ray.train.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    initial = loop_config.get("initial_checkpoint")
    with checkpoint.as_directory() if checkpoint else nullcontext(initial) as resume_dir:
        train(
            config,
            None,
            cache_dir=loop_config.get("cache_dir"),
            resume_from=resume_dir,
            report=report,
            rank=rank,
            world_size=world_size,
            device=ray.train.torch.get_device(),
            prepare_model=partial(
                ray.train.torch.prepare_model,
                move_to_device=False,
                parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters(config)},
            ),
            log=lambda msg: print(f"[rank {rank}] {msg}", file=sys.stderr),
        )


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
) -> dict[str, Any]:
    """Run ``config`` on ``workers`` Ray Train workers; writes ``output_dir`` like a local run.

    A ``output_dir`` that holds a checkpoint of the same config is resumed.
    """
    if workers < 1:
        raise SmileError(f"--workers={workers}: need at least one worker")
    if config.batch_size % workers:
        raise SmileError(f"batch_size={config.batch_size} does not split evenly over {workers} workers")
    out = Path(output_dir).resolve()
    initial = out / "checkpoint"
    if (initial / CHECKPOINT_FILE).is_file():  # refuse a corrupt or foreign one before starting Ray
        check_same_config(read_checkpoint(initial / CHECKPOINT_FILE), config, initial / CHECKPOINT_FILE)
    connect(address)
    if config.weights == "source" and not address:
        load_source(config, cache_dir)  # pre-train once here, not once per worker
    started = time.perf_counter()
    trainer = ray.train.torch.TorchTrainer(
        worker_loop,
        train_loop_config={
            "config": config.to_dict(),
            "cache_dir": str(cache_dir) if cache_dir else None,
            "initial_checkpoint": str(initial) if (initial / CHECKPOINT_FILE).is_file() else None,
            "progress": progress,
        },
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker or _default_cpus_per_worker(workers, use_gpu)},
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{int(time.time())}",
            storage_path=storage_path or str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; surface the user's own error as one line
        cause = _user_error(e)
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
        shutil.copy2(final / CHECKPOINT_FILE, tmp / CHECKPOINT_FILE)
        shutil.rmtree(initial, ignore_errors=True)
        tmp.rename(initial)
    atomic_write_json(metrics, out / "metrics.json")
    return metrics


def _default_cpus_per_worker(workers: int, use_gpu: bool) -> int:
    """On CPU, share the cluster's CPUs among the workers (Ray sets each worker's torch
    threads to its CPU count, so one worker alone would otherwise run single-threaded)."""
    if use_gpu:
        return 1
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)


def _user_error(e: BaseException) -> SmileError | None:
    """The SmileError a worker raised, found through Ray's wrappers, if any."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, SmileError):
            return SmileError(str(cur))
        stack.extend([cur.__cause__, cur.__context__])
        for attr in ("worker_failures", "errors"):
            value = getattr(cur, attr, None)
            if isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
        text = str(cur)
        if "SmileError: " in text:
            return SmileError(text.split("SmileError: ", 1)[1].strip().splitlines()[0])
    return None
