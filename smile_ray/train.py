"""The training recipe: set up, loop, clean up -- in plain PyTorch.

:func:`train` is what every entry point runs: ``smile-ray train`` in-process, each Ray
Train worker, each Ray Tune trial. It knows nothing of Ray or MLflow: an orchestration
layer hooks in through ``report(metrics, checkpoint_dir)`` (called at every evaluation
with a fresh checkpoint), ``rank``/``world_size`` (which shard of each global batch this
process trains on) and ``prepare_model`` (e.g. a DistributedDataParallel wrapper).

Schedule (reference implementation): SGD with Nesterov momentum, learning rate x0.1 at
two thirds of training; the method decides what each step's loss is.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smile_ray import rng
from smile_ray.config import Config, config_diff
from smile_ray.data import TensorTask, build_task
from smile_ray.errors import SmileError
from smile_ray.methods import Method, build_method, unwrap
from smile_ray.models import TransferNet
from smile_ray.pretrain import load_source

CHECKPOINT_FILE = "state.pt"
Report = Callable[[dict[str, Any], str], None]


@dataclass
class Run:
    """Everything a training step touches."""

    config: Config
    device: torch.device
    task: TensorTask
    model: nn.Module  # the TransferNet, possibly wrapped for data parallelism
    method: Method
    optimizer: torch.optim.Optimizer
    source_weights: str

    def autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def to_device(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        fmt = torch.channels_last if self.config.channels_last else torch.contiguous_format
        return (
            x.to(self.device, memory_format=fmt, non_blocking=True),
            y.to(self.device, non_blocking=True),
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SmileError(f"device={name}: no CUDA device is available here")
    return torch.device(name)


def learning_rate(config: Config, step: int) -> float:
    return config.lr * (0.1 if step >= config.lr_decay_step else 1.0)


def setup(
    config: Config,
    cache_dir: str | Path | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
    task: TensorTask | None = None,
    log: Callable[[str], None] = print,
) -> Run:
    """Build data, models, method and optimiser for ``config`` (``task`` overrides the
    config's dataset, e.g. with synthetic batches for benchmarks)."""
    if config.batch_size % world_size:
        raise SmileError(f"batch_size={config.batch_size} does not split evenly over {world_size} workers")
    device = device or resolve_device(config.device)
    task = task or build_task(config)
    source, source_weights = load_source(config, cache_dir, log=log)
    if source.in_channels == 1 and task.in_channels != 1:
        raise SmileError(f"backbone {config.backbone!r} takes 1-channel images; dataset {config.dataset!r} has {task.in_channels}")
    method = build_method(config, rank=rank)
    with torch.random.fork_rng():
        torch.manual_seed(rng.derive_seed(config.seed, rng.INIT))
        model = TransferNet(source, task.num_classes, source_head=method.uses_source_head)
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    source.to(device, memory_format=fmt)
    method.attach(model, source)
    if prepare_model is not None:
        model = prepare_model(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
        weight_decay=config.weight_decay,
    )
    return Run(config, device, task, model, method, optimizer, source_weights)


def train_step(run: Run, step: int, x: Tensor, y: Tensor) -> Tensor:
    """One optimiser step on ``(x, y)`` (already on the device); returns the detached loss.

    No host synchronisation happens here: the loss stays on the device.
    """
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.config, step)
    with run.autocast():
        loss, _ = run.method.loss(run.model, x, y, step)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.method.after_step(run.model, step)
    return loss.detach()


@torch.inference_mode()
def evaluate(run: Run, split: str) -> dict[str, float]:
    """Top-1 accuracy, expected calibration error (15 bins) and NLL on ``split``."""
    model = unwrap(run.model)
    model.eval()
    logits, labels = [], []
    for x, y in run.task.eval_batches(split):
        x, y = run.to_device(x, y)
        with run.autocast():
            logits.append(model(x).logits.float())
        labels.append(y)
    model.train()
    logits, labels = torch.cat(logits), torch.cat(labels)
    return {
        "acc": (logits.argmax(1) == labels).float().mean().item(),
        "ece": expected_calibration_error(logits, labels),
        "nll": F.cross_entropy(logits, labels).item(),
    }


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` over equal-width confidence bins."""
    conf, pred = torch.softmax(logits, 1).max(1)
    correct = (pred == labels).float()
    which = torch.clamp((conf * bins).ceil().long() - 1, 0, bins - 1)
    # |B_b|/N * |acc_b - conf_b| = |sum of correct - sum of confidence in b| / N
    acc = torch.zeros(bins, device=logits.device).index_add_(0, which, correct)
    cnf = torch.zeros(bins, device=logits.device).index_add_(0, which, conf)
    return ((acc - cnf).abs().sum() / len(labels)).item()


# ------------------------------------------------------------------ checkpoints


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def save_checkpoint(run: Run, path: Path, step: int, history: list, seconds: float, resumed_from: list) -> None:
    atomic_save(
        {
            "step": step,
            "config": run.config.to_dict(),
            "model": unwrap(run.model).state_dict(),
            "method": run.method.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
            "seconds": seconds,
            "resumed_from": resumed_from,
        },
        path,
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; one-line errors for bad files."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SmileError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise SmileError(f"checkpoint {path} is unreadable or corrupt ({e.__class__.__name__})") from None
    if not isinstance(state, dict) or not {"step", "config", "model", "optimizer"} <= set(state):
        raise SmileError(f"checkpoint {path} is not a smile-ray checkpoint")
    return state


def check_same_config(state: dict[str, Any], config: Config, path: Path) -> None:
    """Refuse a checkpoint made with another config (the device may change)."""
    changed = [k for k in config_diff(state["config"], config.to_dict()) if k != "device"]
    if changed:
        k = changed[0]
        raise SmileError(
            f"checkpoint {path} was made with {k}={state['config'].get(k)!r}, not {getattr(config, k)!r}; "
            "use another output directory (or --overwrite) to start afresh"
        )


def restore(run: Run, state: dict[str, Any], path: Path) -> None:
    check_same_config(state, run.config, path)
    try:
        unwrap(run.model).load_state_dict(state["model"])
        run.method.load_state_dict(state["method"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise SmileError(f"checkpoint {path} does not fit this model ({e.__class__.__name__})") from None
    torch.set_rng_state(state["torch_rng"])


# ------------------------------------------------------------------ the recipe


def train(
    config: Config,
    output_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    report: Report | None = None,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune one model; returns (and, with ``output_dir``, writes) its metrics.

    With ``output_dir`` the checkpoint lives in ``output_dir/checkpoint/state.pt`` and a
    run whose directory already holds one resumes from it. ``resume_from`` names a
    checkpoint directory explicitly (what Ray hands a restarted worker). Evaluation on the
    validation split runs every ``eval_every`` steps; the test split is scored once, at
    the end.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    lead = rank == 0
    out = Path(output_dir) if output_dir is not None else None
    # Checkpoints go where they can be resumed from (output_dir) or handed on (report);
    # a run with neither writes none.
    scratch = out is None and report is not None
    ckpt_dir = out / "checkpoint" if out is not None else Path(tempfile.mkdtemp(prefix="smile-ray-ckpt-")) if scratch else None
    run = setup(config, cache_dir, rank=rank, world_size=world_size, device=device, prepare_model=prepare_model, log=log)

    step, history, seconds, resumed_from = 0, [], 0.0, []
    resume_path = Path(resume_from) / CHECKPOINT_FILE if resume_from else ckpt_dir / CHECKPOINT_FILE if ckpt_dir else None
    if resume_from or (resume_path is not None and resume_path.is_file()):
        state = read_checkpoint(resume_path)
        restore(run, state, resume_path)
        step, history, seconds = state["step"], list(state["history"]), float(state["seconds"])
        resumed_from = list(state.get("resumed_from", [])) + [step]
        if lead and step:
            log(f"resuming from step {step} ({resume_path})")

    bar = None
    if progress and lead:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=step, desc=f"{config.method} {config.dataset}", unit="step",
                   file=sys.stderr, dynamic_ncols=True)
    loss_sum, loss_n = torch.zeros((), device=run.device), 0
    started = time.perf_counter()
    while step < config.steps:
        x, y = run.to_device(*run.task.train_batch(step, config.batch_size, rank, world_size))
        loss_sum += train_step(run, step, x, y)
        loss_n += 1
        step += 1
        if bar is not None:
            bar.update(1)
        if step % config.eval_every == 0 or step == config.steps:
            entry = {"step": step}
            if lead:  # other ranks hold the same weights; only rank 0's metrics are kept
                val = evaluate(run, "val")
                entry.update(train_loss=(loss_sum / loss_n).item(), lr=learning_rate(config, step - 1),
                             val_acc=val["acc"], val_ece=val["ece"])
                if not math.isfinite(entry["train_loss"]):
                    raise SmileError(f"training diverged at step {step} (loss {entry['train_loss']}); "
                                     "lower lr or the loss weights")
                history.append(entry)
                if bar is not None:
                    bar.set_postfix(loss=f"{entry['train_loss']:.3f}", val_acc=f"{val['acc']:.3f}")
                if ckpt_dir is not None:
                    elapsed = seconds + time.perf_counter() - started
                    save_checkpoint(run, ckpt_dir / CHECKPOINT_FILE, step, history, elapsed, resumed_from)
            loss_sum, loss_n = torch.zeros((), device=run.device), 0
            if report is not None and step < config.steps:
                report(dict(entry), str(ckpt_dir))
    if bar is not None:
        bar.close()
    seconds += time.perf_counter() - started
    consistent = ranks_consistent(run) if world_size > 1 else None

    if not lead:
        if report is not None:
            report({"step": step, "done": True}, str(ckpt_dir))
        if scratch:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        return {"step": step}

    val, test = evaluate(run, "val"), evaluate(run, "test")
    metrics = {
        "method": config.method,
        "dataset": config.dataset,
        "val_acc": val["acc"],
        "val_ece": val["ece"],
        "test_acc": test["acc"],
        "test_ece": test["ece"],
        "test_nll": test["nll"],
        "steps": step,
        "seconds": seconds,
        "workers": world_size,
        "resumed_from": resumed_from,
        "source_weights": run.source_weights,
        "split_sizes": run.task.split_sizes(),
        "history": history,
        "config": config.to_dict(),
    }
    if consistent is not None:
        metrics["ranks_consistent"] = consistent
    # The run's files go to output_dir, or into the checkpoint that report hands on.
    for where in [d for d in (out, ckpt_dir if scratch else None) if d is not None]:
        atomic_save(unwrap(run.model).state_dict(), where / "model.pt")
        atomic_write_json(metrics, where / "metrics.json")
    if report is not None:
        final = {k: v for k, v in metrics.items() if k not in ("history", "config", "split_sizes", "resumed_from")}
        report({**history[-1], **final, "done": True} if history else final, str(ckpt_dir))
    if scratch:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return metrics


def ranks_consistent(run: Run) -> bool:
    """Whether every data-parallel rank holds the same student and teacher parameters
    (gathered checksums; BatchNorm buffers are rank 0's, broadcast by DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    tensors = list(unwrap(run.model).parameters()) + [t for t in run.method.state_dict().get("teacher", {}).values()
                                                    if t.is_floating_point()]
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().numpy().tobytes())
    digest = h.hexdigest()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest)
    return all(g == gathered[0] for g in gathered)
