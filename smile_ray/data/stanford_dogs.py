"""``stanford_dogs``: Stanford Dogs (120 breeds, 12,000 training and 8,580 test images).
``data_root`` holds::

    Images/<wnid>-<breed>/<file>.jpg
    train_list.mat    file_list: Nx1 cell of "<wnid>-<breed>/<file>.jpg"; labels: Nx1 double, 1..120
    test_list.mat

(or a ``stanford_dogs/`` folder holding them). Label = labels - 1; a class is named by
the breed part of its images' folder (``n02085620-Chihuahua`` -> ``Chihuahua``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from smile_ray.config import Config
from smile_ray.data.task import DatasetSpec
from smile_ray.data.catalog import Catalog, FileImages, dataset_root, find_base, load_mat, mat_vector
from smile_ray.data.images import ImageTask, image_task
from smile_ray.errors import SmileError

NAME = "stanford_dogs"
LAYOUT = "Images/<wnid>-<breed>/<file>.jpg, train_list.mat and test_list.mat (the Stanford Dogs archive and lists)"


def catalog(data_root: str) -> Catalog:
    base = find_base(dataset_root(data_root, NAME, LAYOUT), "train_list.mat", ("stanford_dogs",))
    parts, folders = {}, {}
    for split in ("train", "test"):
        path = base / f"{split}_list.mat"
        data = load_mat(path, NAME, LAYOUT, ["file_list", "labels"])
        files = [str(f).replace("\\", "/") for f in mat_vector(data["file_list"])]
        labels = mat_vector(data["labels"]).astype(np.float64)
        if len(files) != len(labels) or not np.all(labels == np.round(labels)):
            raise SmileError(f"{NAME}: {path}: file_list and labels do not pair up as N files with integer labels")
        labels = labels.astype(np.int64) - 1
        for f, label in zip(files, labels):
            folders.setdefault(int(label), f.split("/")[0])
        parts[split] = (FileImages([base / "Images" / f for f in files]), labels)
    num_classes = max(folders) + 1
    classes = [folders.get(c, str(c + 1)).split("-", 1)[-1] for c in range(num_classes)]
    return Catalog(NAME, base, classes, *parts["train"], *parts["test"])


def stanford_dogs_target(config: Config, cache_dir: str | Path | None = None) -> ImageTask:
    return image_task(config, catalog(config.data_root))


STANFORD_DOGS = DatasetSpec(target=stanford_dogs_target)
