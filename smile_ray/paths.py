"""Where the package keeps files of its own: the cache folder.

The cache holds what is derived once and reused by every run: pre-trained source models
(:mod:`smile_ray.pretrain`), the digits corpus as a file (:mod:`smile_ray.data.digits`) and
the methods' one-off preparations (:meth:`smile_ray.methods.base.Method.prepare`). It sits
on the ground floor, beside :mod:`smile_ray.errors`, so every layer that needs it imports it
downwards. It imports nothing of the package.
"""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$SMILE_RAY_CACHE``, else ``$XDG_CACHE_HOME/smile-ray``, else ``~/.cache/smile-ray``."""
    if os.environ.get("SMILE_RAY_CACHE"):
        return Path(os.environ["SMILE_RAY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smile-ray"


def cache_root(given: str | Path | None = None) -> Path:
    """The cache folder of a run: ``given`` (a ``cache_dir=`` argument) as a path, or the
    default one when it is None or empty."""
    return Path(given) if given else default_cache_dir()
