"""The training recipe: set up, loop, clean up -- in plain PyTorch.

:func:`train` is what every entry point runs: ``smile-ray train`` in-process, each Ray
Train worker, each Ray Tune trial. It knows nothing of Ray or MLflow; whatever
orchestrates it hooks in through

* ``on_eval(record, checkpoint_dir)``: called on every rank at every evaluation;
  ``record`` holds the step's metrics on rank 0 (only ``step`` elsewhere).
  ``checkpoint_dir`` is a directory holding one complete checkpoint (``state.pt``) that
  no earlier call was handed, or None: on ranks > 0, in a run that writes no files, and
  at an evaluation with no new checkpoint. Checkpoints are written in the background
  (every ``checkpoint_every`` steps, apart from the evaluations), so the one handed over
  is the newest from an *earlier* step -- ``record["checkpoint_step"]`` says which --
  except at the last evaluation, which waits for and hands over the final checkpoint.
  The directory is the hook's only during the call (copy what you keep: Ray's report
  does); the run deletes it afterwards. :class:`~smile_ray.checkpoint.Checkpoints` has
  the details;
* ``on_end(metrics)``: called on every rank once the run's files are written;
* ``rank``/``world_size`` (which shard of each global batch this process trains on) and
  ``prepare_model`` (e.g. a DistributedDataParallel wrapper).

Schedule (reference implementation): SGD with Nesterov momentum, learning rate x0.1
from ``config.resolved_lr_decay_step`` on; the method decides what each step's loss is.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from smile_ray import rng
from smile_ray.checkpoint import (CHECKPOINT_FILE, Checkpoints, LoopState, host_copy, restore_run, run_state,
                                  save_torch, write_json)
from smile_ray.config import Config
from smile_ray.cpus import process_cpus
from smile_ray.data import Task, build_task
from smile_ray.errors import SmileError
from smile_ray.methods import Method, build_method, unwrap
from smile_ray.metrics import classification_metrics, interpolation_losses, reliability_bins
from smile_ray.models import TransferNet
from smile_ray.optim import SGD, build_sgd
from smile_ray.pretrain import load_source

OnEval = Callable[[dict[str, Any], "Path | None"], None]
OnEnd = Callable[[dict[str, Any]], None]


@dataclass
class Run:
    """Everything a training step touches."""

    config: Config
    device: torch.device
    task: Task
    model: nn.Module  # the TransferNet, possibly wrapped for data parallelism
    method: Method
    optimizer: SGD | torch.optim.Optimizer  # build_sgd's: fused torch SGD on CUDA, smile_ray.optim.SGD elsewhere
    source_weights: str
    rank: int = 0  # which shard of each global batch this process trains on
    world_size: int = 1

    @cached_property
    def bf16(self) -> bool:
        """Whether the steps autocast to bf16, decided once per run (on CUDA it reads the
        GPU's compute capability, a driver call that has no place in every step)."""
        return uses_bf16(self.config, self.device)

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def to_device(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """A batch on the device, in the run's memory format; uint8 pixels (the image
        tasks' batches on CUDA) are normalised there, after the copy of a quarter of the
        bytes."""
        fmt = torch.channels_last if uses_channels_last(self.config, self.device) else torch.contiguous_format
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = self.task.normalize(x)
        return x.contiguous(memory_format=fmt), y.to(self.device, non_blocking=True)


class Prefetcher:
    """The training batches of an in-memory task, built one step ahead on a background
    thread and, with ``pin``, copied to pinned memory there, so that building batch k+1
    overlaps step k and its host-to-device copy is truly asynchronous
    (``non_blocking=True`` from pageable memory is a synchronous copy). Used on CUDA; the
    batches are the task's keyed ones, so results do not change. Asking for a step other
    than the next one (a resumed run) restarts the pipeline there."""

    def __init__(self, task: Task, batch_size: int, rank: int = 0, world_size: int = 1, pin: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self.task, self.batch_size, self.rank, self.world_size, self.pin = task, batch_size, rank, world_size, pin
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="smile-ray-batches")
        self._step, self._future = -1, None

    def _build(self, step: int) -> tuple[Tensor, Tensor]:
        x, y = self.task.train_batch(step, self.batch_size, self.rank, self.world_size)
        return (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        if self._future is None or self._step != step:
            if self._future is not None:
                self._future.cancel()
            self._future = self._pool.submit(self._build, step)
        x, y = self._future.result()
        self._step, self._future = step + 1, self._pool.submit(self._build, step + 1)
        return x, y

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def pick_device(name: str, cuda_available: bool, assigned: Sequence[str] | None = None,
                where: str = "this machine") -> torch.device:
    """The device a run trains on: a pure function of the ``device`` setting, whether
    CUDA works in this process, and ``assigned``, the accelerator ids a scheduler gave
    this process (``None`` outside one).

    * Outside a scheduler ``auto`` is CUDA wherever it works.
    * Inside Ray (``assigned`` given) ``auto`` is the GPUs Ray assigned: CUDA only when it
      was given some. Ray 2.60 no longer hides the node's GPUs from a task that reserved
      none, so a CPU trial on a GPU node would otherwise take GPU 0 behind Ray's back.
      Ray makes the assigned GPUs the only visible ones, so the device is ``cuda`` (= the
      first assigned, as ``ray.train.torch.get_device`` gives a one-GPU worker).
    * GPUs asked for (``assigned`` non-empty, or ``device=cuda``) but CUDA not usable (no
      device, a driver too old for this torch build) is an error naming ``where``, never
      a silent run on the CPU.
    """
    if assigned:
        if not cuda_available:
            raise SmileError(f"GPU {', '.join(map(str, assigned))} was assigned to this run on {where}, but CUDA "
                             f"is not usable there (no device, or an NVIDIA driver too old for torch "
                             f"{torch.__version__}); check nvidia-smi on that node")
        return torch.device("cuda" if name == "auto" else name)
    if name == "auto":
        return torch.device("cuda" if cuda_available and assigned is None else "cpu")
    if name.startswith("cuda") and not cuda_available:
        raise SmileError(f"device={name}: no CUDA device is available on {where}")
    return torch.device(name)


def resolve_device(name: str, assigned: Sequence[str] | None = None, where: str = "this machine") -> torch.device:
    """:func:`pick_device` for this process (``torch.cuda.is_available()``)."""
    return pick_device(name, torch.cuda.is_available(), assigned, where)


def bf16_autocast(precision: str, device_type: str, capability: tuple[int, int] | None = None) -> bool:
    """Whether a run autocasts to bf16 (the parameters, the optimiser and the losses stay
    fp32): ``precision`` bf16 always, fp32 never, auto on CUDA GPUs that compute in bf16
    natively, compute ``capability`` >= (8, 0) (Ampere: A100, H100, ...). Older GPUs (T4,
    V100: 7.x) emulate bf16 and step slower with it than in fp32, so auto is fp32 there,
    as on the CPU."""
    if precision != "auto":
        return precision == "bf16"
    return device_type == "cuda" and capability is not None and tuple(capability) >= (8, 0)


def uses_bf16(config: Config, device: torch.device) -> bool:
    """:func:`bf16_autocast` for ``device`` (its compute capability read from CUDA)."""
    if config.precision != "auto" or device.type != "cuda":
        return bf16_autocast(config.precision, device.type)
    return bf16_autocast(config.precision, device.type, torch.cuda.get_device_capability(device))


def uses_channels_last(config: Config, device: torch.device) -> bool:
    """``channels_last``: auto is on for CUDA (tensor-core convolutions want NHWC) and off
    on CPU, where this project's networks step slower in it."""
    return config.channels_last == "true" or (config.channels_last == "auto" and device.type == "cuda")


def learning_rate(config: Config, step: int) -> float:
    return config.lr * (0.1 if step >= config.resolved_lr_decay_step else 1.0)


class Student(nn.Module):
    """The student as ``module`` of a wrapper, as DistributedDataParallel holds it: what
    ``compile=true`` compiles in one process, so that :func:`unwrap` finds the eager
    student there too (see :func:`compile_student`)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def compile_student(model: nn.Module, method: Method, threads: int = 0) -> nn.Module:
    """``compile=true``: torch.compile the training step's forwards; returns what the
    steps call.

    * Order: ``model`` is already wrapped for data parallelism (DDP) and the wrapper is
      compiled, not the student inside it. Compiled inside, the backward is one opaque
      autograd function whose gradients reach DDP's reducer only at its end, so no
      all-reduce overlaps the backward; compiling the wrapper lets Dynamo's DDP optimiser
      split the graph at DDP's bucket boundaries, so each bucket's all-reduce starts while
      the rest of the backward runs. In one process the student gets a plain
      :class:`Student` wrapper instead, so both cases have the same shape.
    * Names: the wrapper is compiled in place (``nn.Module.compile``) and the student
      inside it stays eager: :func:`unwrap` gives the student, whose parameter names,
      state dict and checkpoints are those of an eager run (either resumes the other).
    * Graphs: evaluation and the interpolation losses run through :func:`unwrap`, the
      eager student (eval mode, inference mode, other batch sizes: compiling them would
      cost two more graphs, each a cold compile of tens of seconds, for a few hundred
      batches). A run thus compiles the training forward and backward of the student
      once (one graph, split into one per DDP bucket under DDP), and one more graph per
      module of ``method.compiled_modules()`` (SMILE's teacher, compiled in place).
    * Compile workers: Inductor starts ``compile_threads`` processes, by default
      min(32, the CPUs of the node), which under Ray is every worker of a node starting
      one per core of the node. Here it is :func:`process_cpus` (at most 32), unless
      ``TORCHINDUCTOR_COMPILE_THREADS`` is set. Set before the first compile, which
      starts the pool; Inductor is imported only here, only with ``compile=true``.
    """
    import torch._inductor.config as inductor_config

    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        inductor_config.compile_threads = min(32, process_cpus(threads))
    if unwrap(model) is model:
        model = Student(model)
    model.compile()
    for module in method.compiled_modules():
        module.compile()
    return model


def setup(
    config: Config,
    cache_dir: str | Path | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
    task: Task | None = None,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> Run:
    """Build data, models, method and optimiser for ``config`` (``task`` overrides the
    config's dataset, e.g. with synthetic batches for benchmarks).

    Torch's CPU threads: ``threads``, or with ``threads: 0`` the CPUs this process may use
    (:func:`smile_ray.cpus.process_cpus`: its affinity, capped by what Ray reserved for
    it), set here rather than left to torch's own guess (physical cores, as its OpenMP
    saw them when it started)."""
    torch.set_num_threads(config.threads or process_cpus())
    if config.batch_size % world_size:
        raise SmileError(f"batch_size={config.batch_size} does not split evenly over {world_size} workers")
    device = device or resolve_device(config.device)
    built, task = task is None, task or build_task(config, cache_dir)
    try:
        source, source_weights = load_source(config, cache_dir, log=log, progress=progress)
        if source.in_channels == 1 and task.in_channels != 1:
            raise SmileError(f"backbone {config.backbone!r} takes 1-channel images; dataset {config.dataset!r} has {task.in_channels}")
        method = build_method(config, rank=rank, world_size=world_size)
        with torch.random.fork_rng():
            torch.manual_seed(rng.derive_seed(config.seed, rng.INIT))
            model = TransferNet(source, task.num_classes, source_head=method.uses_source_head,
                                head_init=config.head_init)
        fmt = torch.channels_last if uses_channels_last(config, device) else torch.contiguous_format
        model.to(device, memory_format=fmt).train()
        source.to(device, memory_format=fmt)
        method.attach(model, source, task=task, cache_dir=cache_dir)
        if prepare_model is not None:
            model = prepare_model(model)
        if config.compile:  # after the DDP wrapper: see compile_student
            model = compile_student(model, method, config.threads)
        task.train_on(device)  # after the methods' preparations, which read float batches
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        # only what trains: a method's frozen parameters (LwF's source head) get no update and no weight decay
        optimizer = build_sgd([p for p in model.parameters() if p.requires_grad], lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay, nesterov=config.momentum > 0)
        return Run(config, device, task, model, method, optimizer, source_weights, rank, world_size)
    except BaseException:
        if built:  # a preparation may have started its workers
            task.close()
        raise


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
    run.method.after_step(run.model, step, run.optimizer)
    return loss.detach()


@torch.inference_mode()
def evaluate(run: Run, split: str, reliability: bool = False) -> dict[str, Any]:
    """Top-1 accuracy, expected calibration error (15 bins) and NLL on ``split``; with
    ``reliability``, also the per-bin data of a reliability diagram."""
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
    out: dict[str, Any] = classification_metrics(logits, labels)
    if reliability:
        out["reliability"] = reliability_bins(logits, labels)
    return out


# ------------------------------------------------------------------ the recipe


def train(
    config: Config,
    output_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    fresh: bool = False,
    on_eval: OnEval | None = None,
    on_end: OnEnd | None = None,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune one model; returns (and, with ``output_dir``, writes) its metrics.

    Rank 0 writes ``metrics.json`` and ``model.pt`` to ``output_dir`` and the checkpoint to
    ``checkpoint_dir`` (default ``output_dir/checkpoint``; a run with neither writes no
    file). A run whose checkpoint directory already holds a checkpoint resumes from it,
    unless ``fresh``: then the old checkpoint is left in place until the new run's first
    checkpoint replaces it, so a run that fails early loses nothing. ``resume_from`` names
    another checkpoint directory to resume from (what Ray hands a restarted worker).
    Evaluation on the validation split runs every ``eval_every`` steps; the test split is
    scored once, at the end. A checkpoint is written every ``checkpoint_every`` steps and
    at the last, in the background (:class:`~smile_ray.checkpoint.Checkpoints`); it holds,
    beside the weights and the states, where the loop stands
    (:class:`~smile_ray.checkpoint.LoopState`), so a resumed run goes on bit for bit.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    started_at, lead = now_utc(), rank == 0
    out = Path(output_dir) if output_dir is not None else None
    # every rank holds the same weights: rank 0's checkpoint is the run's
    ckpt_dir = None if not lead else Path(checkpoint_dir) if checkpoint_dir is not None else \
        out / "checkpoint" if out is not None else None
    run = setup(config, cache_dir, rank=rank, world_size=world_size, device=device, prepare_model=prepare_model,
                log=log, progress=progress and lead)
    try:
        state = resume(run, ckpt_dir, resume_from, fresh, log=log if lead else None)

        bar = progress_bar(run, state, log) if progress and lead else None
        with Loop(run, state, ckpt_dir, on_eval, bar=bar) as loop:
            while state.step < config.steps:
                x, y = loop.batch(state.step)
                state.add_step(train_step(run, state.step, x, y))
                loop.after_step()

        consistent = ranks_consistent(run) if world_size > 1 else None
        metrics = final_metrics(run, state, started_at, consistent) if lead else {"step": state.step}
        if lead and out is not None:
            save_torch(host_copy(unwrap(run.model).state_dict(), copy=False), out / "model.pt")
            write_json(metrics, out / "metrics.json")
        if on_end is not None:
            on_end(metrics)
        return metrics
    finally:
        # the data workers stop with the run: left to a later garbage collection, each
        # loader's would stall it 5 s (smile_ray.data.images._stop_workers)
        run.task.close()


def resume(run: Run, ckpt_dir: Path | None, resume_from: str | Path | None, fresh: bool,
           log: Callable[[str], None] | None) -> LoopState:
    """Where the loop starts: the checkpoint of ``resume_from`` (a checkpoint directory), or
    else the one in ``ckpt_dir`` unless ``fresh``, restored into ``run``; else step 0."""
    path = Path(resume_from) / CHECKPOINT_FILE if resume_from else ckpt_dir / CHECKPOINT_FILE if ckpt_dir else None
    if not resume_from and (fresh or path is None or not path.is_file()):
        return LoopState(loss_sum=torch.zeros((), device=run.device))
    state = restore_run(run, path)
    if log is not None and state.step:
        log(f"resuming from step {state.step} ({path})")
    return state


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def progress_bar(run: Run, state: LoopState, log: Callable[[str], None]) -> Any:
    """A line saying what runs, then a tqdm bar on stderr from the loop's step."""
    from tqdm import tqdm

    c = run.config
    log(f"{c.method} on {c.dataset}: {c.backbone}, {c.steps} steps, {run.device}, "
        f"{plural(torch.get_num_threads(), 'thread')}")
    return tqdm(total=c.steps, initial=state.step, desc=f"{c.method} {c.dataset}", unit="step", file=sys.stderr,
                dynamic_ncols=True)


class Loop:
    """What happens around the steps of :func:`train`: batches (built ahead by a
    :class:`Prefetcher` for an in-memory task on CUDA; the image tasks' DataLoader
    already prefetches and pins, and on CPU a builder thread would only take cores from
    the step), the progress bar, the evaluations with their divergence check, the
    checkpoints and the ``on_eval`` hook (:meth:`after_step`); on leaving, a failed
    ``torch.compile`` becomes one line, and the bar, the prefetcher and the checkpoint
    writer are closed, the last checkpoint on disk even when the run fails."""

    def __init__(self, run: Run, state: LoopState, ckpt_dir: Path | None, on_eval: OnEval | None, bar: Any = None):
        self.run, self.state, self.ckpt_dir, self.on_eval, self.bar = run, state, ckpt_dir, on_eval, bar
        self.prefetch = (Prefetcher(run.task, run.config.batch_size, run.rank, run.world_size, pin=True)
                         if run.device.type == "cuda" and not run.task.builds_ahead else None)
        self.checkpoints = Checkpoints(ckpt_dir, handed_on=on_eval is not None)

    def __enter__(self) -> "Loop":
        self.started = time.perf_counter()
        return self

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The training batch of ``step``, on the device."""
        run = self.run
        x, y = self.prefetch.batch(step) if self.prefetch is not None else \
            run.task.train_batch(step, run.config.batch_size, run.rank, run.world_size)
        return run.to_device(x, y)

    def after_step(self) -> None:
        """After each step: the bar; at an evaluation step, the validation metrics (rank 0);
        at a checkpoint step, the checkpoint; then the hook, handed the newest complete
        checkpoint (:meth:`~smile_ray.checkpoint.Checkpoints.hand_on`)."""
        run, state, c = self.run, self.state, self.run.config
        if self.bar is not None:
            self.bar.update(1)
        last = state.step == c.steps
        evaluates = state.step % c.eval_every == 0 or last
        if evaluates:
            record = self.evaluation()
        if self.ckpt_dir is not None and (state.step % c.checkpoint_interval == 0 or last):
            self.checkpoints.save(state.step, run_state(run, state, state.seconds + time.perf_counter() - self.started))
        if evaluates and self.on_eval is not None:
            handed = self.checkpoints.hand_on(state.step, last)
            if handed is None:
                self.on_eval(dict(record), None)
            else:
                self.on_eval({**record, "checkpoint_step": handed[0]}, handed[1])
                self.checkpoints.handed(handed[1])

    def evaluation(self) -> dict[str, Any]:
        """The record of an evaluation (rank 0's metrics; other ranks, holding the same
        weights, only the step), added to the history; the loss sum starts again."""
        run, state = self.run, self.state
        record: dict[str, Any] = {"step": state.step}
        if run.rank == 0:  # other ranks hold the same weights; only rank 0's metrics are kept
            val = evaluate(run, "val")
            record.update(train_loss=(state.loss_sum / state.loss_steps).item(),
                          lr=learning_rate(run.config, state.step - 1), val_acc=val["acc"], val_ece=val["ece"])
            if not math.isfinite(record["train_loss"]):
                raise SmileError(f"training diverged at step {state.step} (loss {record['train_loss']}); "
                                 "lower lr or the loss weights")
            state.history.append(record)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_acc=f"{val['acc']:.3f}")
        state.loss_sum, state.loss_steps = torch.zeros((), device=run.device), 0
        return record

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        try:
            if error is not None and self.run.config.compile and \
                    type(error).__module__.startswith(("torch._dynamo", "torch._inductor")):
                first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
                raise SmileError(f"compile=true: torch.compile failed ({first}); set compile=false") from None
        finally:  # an interrupted run leaves its bar where it stopped, before the error line
            if self.bar is not None:
                self.bar.close()
            if self.prefetch is not None:
                self.prefetch.close()
            self.checkpoints.close()  # the last checkpoint is on disk before the run ends, even on error
        if error is None:
            self.state.seconds += time.perf_counter() - self.started


def final_metrics(run: Run, state: LoopState, started_at: str, consistent: bool | None) -> dict[str, Any]:
    """``metrics.json``: the final validation and test scores, the paper's interpolation
    losses (Eq. 1, once, on rank 0's and so every rank's final weights), and what the
    run was: where, how long, on what data, with what config."""
    c = run.config
    val, test = evaluate(run, "val"), evaluate(run, "test", reliability=True)
    il = interpolation_losses(unwrap(run.model), run.task, c.seed, run.to_device, pairs=c.il_pairs)
    metrics = {
        "method": c.method,
        "dataset": c.dataset,
        "val_acc": val["acc"],
        "val_ece": val["ece"],
        "test_acc": test["acc"],
        "test_ece": test["ece"],
        "test_nll": test["nll"],
        **il,
        "reliability": test["reliability"],
        "steps": state.step,
        "seconds": state.seconds,
        "started_at": started_at,
        "finished_at": now_utc(),
        "workers": run.world_size,
        "threads": torch.get_num_threads(),
        "device": str(run.device),
        "resumed_from": state.resumed_from,
        "source_weights": run.source_weights,
        "split_sizes": run.task.split_sizes(),
        "classes": run.task.classes,
        "skipped_images": run.task.skipped_images,
        "method_info": run.method.info(),
        "history": state.history,
        "config": c.to_dict(),
    }
    if consistent is not None:
        metrics["ranks_consistent"] = consistent
    return metrics


def now_utc() -> str:
    """The wall-clock time as ISO 8601 in UTC to the millisecond (``started_at`` and
    ``finished_at`` of metrics.json: this process's call, so a resumed run's start is its
    resumption; ``seconds`` is the loop's time summed over every part of the run)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def ranks_consistent(run: Run) -> bool:
    """Whether every data-parallel rank holds the same student parameters and the same
    tensors the method says must agree (:meth:`~smile_ray.methods.base.Method.rank_state`:
    SMILE's teacher) -- gathered checksums; BatchNorm buffers are rank 0's, broadcast by DDP."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    h = hashlib.sha256()
    for t in [*unwrap(run.model).parameters(), *run.method.rank_state()]:
        h.update(t.detach().float().cpu().numpy().tobytes())
    digest = h.hexdigest()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest)
    return all(g == gathered[0] for g in gathered)
