"""Files a run writes: atomic writes, checkpoints, and their checks on resume.

Every file smile-ray writes goes through :func:`atomic_write`: written to a temporary
file beside the target and renamed over it, so a reader (or a resumed run) sees the old
file or the new one, never half of one.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
from contextlib import contextmanager
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
REQUIRED = ("step", "config", "model", "optimizer")


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
    """Refuse a checkpoint made with another config (the device and the number of data
    workers may change). A key the checkpoint lacks (it predates the key) counts as its
    default, which is what the older code did."""
    saved = {**Config().to_dict(), **state["config"]}
    if isinstance(saved["channels_last"], bool):
        # made before precision and channels_last took "auto": its defaults (fp32, false)
        # are what auto chooses on the CPU, so they resume under auto
        saved["channels_last"] = str(saved["channels_last"]).lower()
        for key, old_default in (("precision", "fp32"), ("channels_last", "false")):
            if saved[key] == old_default and getattr(config, key) == "auto":
                saved[key] = "auto"
    changed = [k for k in config_diff(saved, config.to_dict()) if k not in RESUME_MAY_CHANGE]
    if changed:
        k = changed[0]
        raise SmileError(
            f"checkpoint {path} was made with {k}={saved.get(k)!r}, not {getattr(config, k)!r}; "
            "start afresh in another output directory, or add --overwrite to replace this run"
        )
