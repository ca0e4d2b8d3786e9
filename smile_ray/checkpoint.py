"""Files a run writes: atomic writes, checkpoints, and their checks on resume.

Every file smile-ray writes goes through :func:`atomic_write`: written to a temporary
file beside the target and renamed over it, so a reader (or a resumed run) sees the old
file or the new one, never half of one.

A run's checkpoint (:func:`run_state`, :func:`restore_run`) holds its weights, the
method's and the optimiser's states, torch's RNG and where the loop stands
(:class:`LoopState`); :class:`Checkpoints` writes them in the background
(:class:`CheckpointWriter`) and chooses which one an orchestrator's hook is handed. The
run is read through its attributes (``config``, ``model``, ``method``, ``optimizer``,
``device``: :class:`smile_ray.recipe.Run`), so this module imports nothing above the config.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from smile_ray.config import Config, config_diff
from smile_ray.errors import SmileError

CHECKPOINT_FILE = "state.pt"
LOCK_FILE = ".smile-ray.lock"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once, at import: os.umask can only be read by setting it, which is not safe once
# other threads (the background checkpoint writer) may be creating files
_FILE_MODE = 0o666 & ~_read_umask()
REQUIRED = ("step", "config", "model", "method", "optimizer", "torch_rng", "history", "seconds", "resumed_from",
            "train_loss_sum", "train_loss_steps")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)  # what open() would have made, not mkstemp's owner-only 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(folder: str | Path, flag: str = "--output", given: str | Path | None = None) -> None:
    """One line, before anything starts, where ``folder`` could not be made and written
    in: its nearest existing ancestor must be a folder this process can create a file in.
    Probed with a temporary file made and removed there, not with permission bits (which
    say nothing for root, a read-only mount or ``/proc``), so nothing is left behind.
    ``given`` is what the user typed (default: ``folder``), for the message."""
    path = Path(folder).absolute()
    shown = f"{flag} {given if given is not None else folder}"
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise SmileError(f"{shown}: {probe} is not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".smile-ray-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        where = "it" if probe == path else probe
        raise SmileError(f"{shown}: cannot write in {where} ({e.strerror or e})") from None


@contextmanager
def folder_lock(folder: str | Path, flag: str = "--output") -> Iterator[None]:
    """Hold ``folder`` for one run: a second run on it is refused in one line while the
    first holds it (both would write the same files, the last writer winning).

    An advisory ``fcntl.flock`` on ``folder/.smile-ray.lock``: the kernel drops it when
    the holder's process ends however it ends, so a crashed or killed run leaves no
    stuck lock (a lock file's mere existence would). The file names the holder. A folder
    this call made and that holds nothing else at the end is removed again, so a run
    refused on later checks leaves nothing behind. (flock is per machine: two nodes on
    one shared folder are not kept apart.)"""
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip()
        os.close(fd)
        raise SmileError(f"{flag} {folder} is in use by another run ({holder or 'a running process'}); "
                         f"wait for it to end, or choose another {flag}") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        if made and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            path.unlink(missing_ok=True)
            folder.rmdir()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_json(obj: Any, path: str | Path) -> Path:
    def dump(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(obj, indent=2))

    return atomic_write(path, dump)


def save_torch(obj: Any, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; one-line errors for bad files."""
    import torch

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SmileError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise SmileError(f"checkpoint {path} is unreadable or corrupt ({e.__class__.__name__})") from None
    if not isinstance(state, dict) or not set(REQUIRED) <= set(state):
        raise SmileError(f"checkpoint {path} is not a smile-ray checkpoint")
    return state


#: keys that may change on resume: they do not change what a run computes
RESUME_MAY_CHANGE = ("device", "data_workers", "checkpoint_every")


def check_same_config(state: dict[str, Any], config: Config, path: Path) -> None:
    """Refuse a checkpoint made with another config (the keys of :data:`RESUME_MAY_CHANGE`
    may differ: they do not change what a run computes)."""
    saved = state["config"]
    changed = [k for k in config_diff(saved, config.to_dict()) if k not in RESUME_MAY_CHANGE]
    if changed:
        k = changed[0]
        raise SmileError(
            f"checkpoint {path} was made with {k}={saved.get(k)!r}, not {getattr(config, k)!r}; "
            "start afresh in another output directory, or add --overwrite to replace this run"
        )


# ------------------------------------------------------------------ a run's checkpoint


@dataclass
class LoopState:
    """Where the training loop stands: what it carries from step to step, and what a
    checkpoint keeps of it. ``loss_sum`` and ``loss_steps`` are the training losses since
    the last evaluation (``loss_sum`` a tensor on the run's device: adding to it needs
    no host synchronisation), kept so that a run resumed between two evaluations reports
    the same ``train_loss`` as an uninterrupted one. ``seconds``: the loop's time, summed
    over every part of a resumed run; ``resumed_from``: the steps it resumed at."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: list[int] = field(default_factory=list)
    loss_sum: Any = 0.0
    loss_steps: int = 0

    def add_step(self, loss: Any) -> None:
        """One more step trained, whose (detached, on-device) loss was ``loss``."""
        self.loss_sum += loss
        self.loss_steps += 1
        self.step += 1


def _student(model: Any) -> Any:
    return getattr(model, "module", model)  # the student inside a DDP (or compile) wrapper


def run_state(run: Any, loop: LoopState, seconds: float | None = None) -> dict[str, Any]:
    """The state a resumed run continues from (the run's own tensors, not copies: see
    :func:`host_copy`); ``seconds`` the loop's time so far (default ``loop.seconds``)."""
    import torch

    return {
        "step": loop.step,
        "config": run.config.to_dict(),
        "model": _student(run.model).state_dict(),
        "method": run.method.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "history": list(loop.history),
        "seconds": loop.seconds if seconds is None else seconds,
        "resumed_from": list(loop.resumed_from),
        "train_loss_sum": loop.loss_sum,
        "train_loss_steps": loop.loss_steps,
    }


def restore_run(run: Any, path: Path) -> LoopState:
    """Load the checkpoint at ``path`` into ``run`` (after checking that it was made with
    the same config) and return where its loop stood."""
    import torch

    from smile_ray.optim import load_optimizer_state

    state = read_checkpoint(path)
    check_same_config(state, run.config, path)
    try:
        _student(run.model).load_state_dict(state["model"])
        run.method.load_state_dict(state["method"])
        load_optimizer_state(run.optimizer, state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise SmileError(f"checkpoint {path} does not fit this model ({e.__class__.__name__})") from None
    torch.set_rng_state(state["torch_rng"])
    step = state["step"]
    return LoopState(step=step, history=list(state["history"]), seconds=float(state["seconds"]),
                     resumed_from=list(state["resumed_from"]) + [step],
                     loss_sum=state["train_loss_sum"].to(run.device), loss_steps=int(state["train_loss_steps"]))


def host_copy(obj: Any, copy: bool = True) -> Any:
    """``obj`` with every tensor in host memory: a file written from it holds CPU tensors
    and loads on any machine without ``map_location`` (``torch.load`` restores a tensor to
    the device it was saved from, and fails where that device does not exist). Strides
    are kept (``.to`` preserves the memory format). With ``copy`` (the background writer)
    every tensor is a new one, even on the CPU, so that training on can no longer change
    it; without it (a file written at once) CPU tensors are the same storage, so a CPU
    run writes the bytes it always wrote and no memory is doubled. A dict keeps its class
    and attributes: a module's state dict is an OrderedDict whose ``_metadata`` (the
    modules' versions, read by ``load_state_dict``) is part of the file's bytes."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=copy)
    if isinstance(obj, dict):
        out = {k: host_copy(v, copy) for k, v in obj.items()}
        if type(obj) is dict:
            return out
        kept = obj.copy()  # the same class, the same key order
        kept.update(out)
        kept.__dict__.update(vars(obj))
        return kept
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v, copy) for v in obj)
    return obj


class CheckpointWriter:
    """Writes a run's checkpoints without stalling its steps for the write.

    ``save`` takes a host copy of the state on the training thread (a memory copy: tens of
    milliseconds for ResNet-50's 300 MB, where serialising and writing it takes seconds)
    and writes it on a background thread through the same atomic rename as every file,
    so a reader sees the previous checkpoint or the new one. ``wait`` blocks until the
    write is on disk and re-raises its error; it is called before the next save and at
    the end of the run, so no checkpoint is ever lost or half-written. With
    ``background`` off every save writes at once (the same bytes; benchmarks compare the
    two). Runs with hooks go through :class:`Checkpoints`, which writes in the background
    too and hands ``on_eval`` only checkpoints whose write has finished."""

    def __init__(self, background: bool = True):
        self._pool = None
        self._pending = None
        if background:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="smile-ray-checkpoint")

    def save(self, state: dict[str, Any], path: Path) -> None:
        """Write ``state`` (e.g. :func:`run_state`'s) to ``path``: its tensors are copied to
        host memory now, written in the background (or at once, without ``background``)."""
        self.wait()
        if self._pool is None:
            save_torch(host_copy(state, copy=False), path)
            return
        self._pending = self._pool.submit(save_torch, host_copy(state), path)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


SNAPSHOTS = ".steps"  # inside a checkpoint directory: the handed-on checkpoints being written


class Checkpoints:
    """A run's checkpoints in ``directory`` (None: none are written), written in the
    background, and which of them an orchestrator is handed at an evaluation.

    Without ``handed_on`` every checkpoint goes straight to ``directory/state.pt``.
    With it (``on_eval`` given), Ray copies the directory it is handed inside ``on_eval``,
    so that directory may not change during the call, nor hold a half-written file. Each
    checkpoint is then written to a fresh ``directory/.steps/<step>/state.pt`` and, once
    complete, hard-linked over ``directory/state.pt`` (one write, two names; a copy where
    the file system has no hard links), so ``directory/state.pt`` is still the newest
    complete checkpoint, what a resumed run reads. One write is in flight at a time (each
    save waits for the previous one), so a checkpoint from an earlier step than the
    evaluation's has had at least one step to finish and is usually complete.

    Which one is handed on (:meth:`hand_on`): the newest checkpoint from a step before the
    evaluation, if no earlier call was handed it -- never the one whose write just
    started, so that the evaluation does not wait for it -- waiting only if its write is
    still going; at the last evaluation, the final checkpoint, waited for. The choice is
    a function of the steps alone, not of the write's speed, so a run's reports repeat.
    With the default ``checkpoint_every`` (= ``eval_every``) evaluation k is handed
    checkpoint k-1, and the first none: Ray restarts a failed run from up to two
    intervals back, where a synchronous write would lose at most one but stall every
    evaluation for the whole write (~290 MB for a SMILE ResNet-50)."""

    def __init__(self, directory: Path | None, handed_on: bool):
        self.directory = directory
        self.handed_on = handed_on and directory is not None
        self.writer = CheckpointWriter(background=True)
        self._last: tuple[int, Path] | None = None  # the newest submitted snapshot, perhaps still being written
        self._ready: tuple[int, Path] | None = None  # the newest complete snapshot not yet handed on
        if self.handed_on:
            shutil.rmtree(directory / SNAPSHOTS, ignore_errors=True)  # an interrupted run's

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Write the checkpoint ``state`` of ``step`` (see the class)."""
        if self.directory is None:
            return
        if not self.handed_on:
            self.writer.save(state, self.directory / CHECKPOINT_FILE)
            return
        snapshot = self.directory / SNAPSHOTS / str(step)
        self.writer.save(state, snapshot / CHECKPOINT_FILE)
        # save waited for the previous write: that snapshot is complete
        self._complete()
        self._last = (step, snapshot)

    def _complete(self) -> None:
        """``_last`` has been written: it becomes ``directory/state.pt`` and the one to hand
        on (an older one never handed on is superseded)."""
        if self._last is None:
            return
        step, snapshot = self._last
        self._last = None

        def link(tmp: str) -> None:
            os.unlink(tmp)
            try:
                os.link(snapshot / CHECKPOINT_FILE, tmp)
            except OSError:
                shutil.copyfile(snapshot / CHECKPOINT_FILE, tmp)

        atomic_write(self.directory / CHECKPOINT_FILE, link)
        if self._ready is not None:
            shutil.rmtree(self._ready[1], ignore_errors=True)
        self._ready = (step, snapshot)

    def hand_on(self, step: int, last: bool) -> tuple[int, Path] | None:
        """The (step, directory) of the checkpoint to hand on at the evaluation of ``step``
        (see the class), or None. Call :meth:`handed` once the hook returns."""
        if not self.handed_on:
            return None
        if self._last is not None and (last or self._last[0] < step):
            self.writer.wait()
            self._complete()
        out, self._ready = self._ready, None
        return out

    def handed(self, snapshot: Path) -> None:
        shutil.rmtree(snapshot, ignore_errors=True)

    def close(self) -> None:
        """Wait for the last write (re-raising its error); ``directory/state.pt`` is then the
        newest complete checkpoint, and the snapshots are gone."""
        try:
            self.writer.close()
            if self.handed_on:
                self._complete()
        finally:
            if self.handed_on:
                shutil.rmtree(self.directory / SNAPSHOTS, ignore_errors=True)
