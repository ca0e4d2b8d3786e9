"""Files a run writes: atomic writes, checkpoints, and their checks on resume.

Every file smile-ray writes goes through :func:`atomic_write`: written to a temporary
file beside the target and renamed over it, so a reader (or a resumed run) sees the old
file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from smile_ray.config import Config, config_diff
from smile_ray.errors import SmileError

CHECKPOINT_FILE = "state.pt"


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
            "start afresh in another output directory"
        )
