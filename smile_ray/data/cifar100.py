"""``cifar100``: CIFAR-100 (100 classes, 50,000 training and 10,000 test images of 32 x 32
pixels), from the Python version's pickles. ``data_root`` is the folder holding
``cifar-100-python/`` (or that folder itself)::

    cifar-100-python/
      train   test    dicts with "data": uint8 (N, 3072) = 1024 R, 1024 G, 1024 B values,
                      each 32 x 32 row-major; "fine_labels": 0..99
      meta            dict with "fine_label_names"

The pickles were written by Python 2: read with ``encoding="latin1"`` and an unpickler
that admits only NumPy's array reconstruction (the files cannot run code). The decoded
arrays (150 MB) are cached once per process and root. Images go through the same
pipeline as files (resized to ``round(image_size * 256 / 224)``, cropped, flipped).
"""
from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path

import numpy as np

from smile_ray.config import Config
from smile_ray.data.task import DatasetSpec
from smile_ray.data.catalog import ArrayImages, Catalog, dataset_root, find_base, need
from smile_ray.data.images import ImageTask, image_task
from smile_ray.errors import SmileError

NAME = "cifar100"
LAYOUT = "cifar-100-python/ with the pickles train, test and meta (the CIFAR-100 python version)"
_NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in _NUMPY:
            return super().find_class(module, name)
        if module in ("copyreg", "_codecs") and name in ("_reconstructor", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def _unpickle(path: Path) -> dict:
    need(path, NAME, LAYOUT)
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f, encoding="latin1").load()
    except Exception as e:  # truncated, foreign or hostile files
        raise SmileError(f"{NAME}: {path} is not a readable CIFAR pickle ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise SmileError(f"{NAME}: {path} holds a {type(data).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in data.items()}


def _split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = _unpickle(path)
    if "data" not in data or "fine_labels" not in data:
        raise SmileError(f"{NAME}: {path} lacks 'data' or 'fine_labels'")
    raw = np.asarray(data["data"], dtype=np.uint8)
    labels = np.asarray(data["fine_labels"], dtype=np.int64)
    if raw.ndim != 2 or raw.shape[1] != 3072 or len(raw) != len(labels):
        raise SmileError(f"{NAME}: {path}: data has shape {raw.shape} for {len(labels)} labels, expected (N, 3072)")
    images = np.ascontiguousarray(raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, RGB)
    images.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=1)
def _load(base: str) -> Catalog:
    root = Path(base)
    meta = _unpickle(root / "meta")
    if "fine_label_names" not in meta:
        raise SmileError(f"{NAME}: {root / 'meta'} lacks 'fine_label_names'")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]]
    parts = {}
    for split in ("train", "test"):
        images, labels = _split(root / split)
        parts[split] = (ArrayImages(images, [f"{root / split}[{i}]" for i in range(len(images))]), labels)
    return Catalog(NAME, root, classes, *parts["train"], *parts["test"])


def catalog(data_root: str) -> Catalog:
    base = find_base(dataset_root(data_root, NAME, LAYOUT), "meta", ("cifar-100-python",))
    return _load(os.path.abspath(base))


def cifar100_target(config: Config, cache_dir: str | Path | None = None) -> ImageTask:
    return image_task(config, catalog(config.data_root))


CIFAR100 = DatasetSpec(target=cifar100_target)
