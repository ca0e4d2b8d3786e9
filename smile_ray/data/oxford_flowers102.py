"""``oxford_flowers102``: Oxford Flowers-102 (102 species, 8,189 images). ``data_root`` holds::

    jpg/image_00001.jpg ... jpg/image_08189.jpg
    imagelabels.mat    labels: 1x8189, values 1..102; entry i is image i+1
    setid.mat          trnid, valid, tstid: 1-based image ids (1,020 / 1,020 / 6,149)

(or a ``flowers-102/`` folder holding them). Label = labels[id - 1] - 1. The training
images are trnid + valid (2,040); validation is held out from them by the shared rule
(``val_fraction``), not taken from ``valid``; the test images are tstid. The archive
names no classes: they are "1".."102".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from smile_ray.config import Config
from smile_ray.data.task import DatasetSpec
from smile_ray.data.catalog import Catalog, FileImages, dataset_root, find_base, load_mat, mat_vector
from smile_ray.data.images import ImageTask, image_task
from smile_ray.errors import SmileError

NAME = "oxford_flowers102"
LAYOUT = "jpg/image_NNNNN.jpg, imagelabels.mat and setid.mat (the Oxford Flowers-102 files)"


def catalog(data_root: str) -> Catalog:
    base = find_base(dataset_root(data_root, NAME, LAYOUT), "setid.mat", ("flowers-102",))
    labels = mat_vector(load_mat(base / "imagelabels.mat", NAME, LAYOUT, ["labels"])["labels"]).astype(np.int64) - 1
    ids = load_mat(base / "setid.mat", NAME, LAYOUT, ["trnid", "valid", "tstid"])
    parts = {}
    for split, keys in (("train", ("trnid", "valid")), ("test", ("tstid",))):
        chosen = np.concatenate([mat_vector(ids[k]).astype(np.int64) for k in keys])
        if len(chosen) and (chosen.min() < 1 or chosen.max() > len(labels)):
            raise SmileError(f"{NAME}: {base / 'setid.mat'}: image ids outside 1..{len(labels)} "
                             f"(the number of labels in {base / 'imagelabels.mat'})")
        parts[split] = (FileImages([base / "jpg" / f"image_{i:05d}.jpg" for i in chosen]), labels[chosen - 1])
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    return Catalog(NAME, base, [str(c + 1) for c in range(num_classes)], *parts["train"], *parts["test"])


def oxford_flowers102_target(config: Config, cache_dir: str | Path | None = None) -> ImageTask:
    return image_task(config, catalog(config.data_root))


OXFORD_FLOWERS102 = DatasetSpec(target=oxford_flowers102_target)
