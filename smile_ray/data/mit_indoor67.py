"""``mit_indoor67``: MIT Indoor-67 (67 scene categories, 80 training and 20 test images
each in the official lists). ``data_root`` holds::

    Images/<category>/<file>.jpg
    TrainImages.txt      one "<category>/<file>" per line
    TestImages.txt

(or an ``indoorCVPR_09/`` folder holding them). Label = position of the category in the
sorted list of the categories the two lists name. The lists have Windows line ends
(stripped). A few files of the public archive cannot be decoded (the paper counts 5,356
training images, not 5,360): run with ``skip_bad_images: true`` to leave them out with
a warning; ``metrics.json`` lists them under ``skipped_images``.
"""
from __future__ import annotations

from pathlib import Path

from smile_ray.config import Config
from smile_ray.data.task import DatasetSpec
from smile_ray.data.catalog import Catalog, FileImages, dataset_root, find_base, read_lines
from smile_ray.data.images import ImageTask, image_task
from smile_ray.errors import SmileError

NAME = "mit_indoor67"
LAYOUT = "Images/<category>/<file>.jpg, TrainImages.txt and TestImages.txt (the MIT Indoor-67 archive and lists)"


def catalog(data_root: str) -> Catalog:
    base = find_base(dataset_root(data_root, NAME, LAYOUT), "TrainImages.txt", ("indoorCVPR_09",))
    lists = {}
    for split, file in (("train", "TrainImages.txt"), ("test", "TestImages.txt")):
        entries = []
        for n, line in read_lines(base / file, NAME, LAYOUT):
            category, sep, name = line.replace("\\", "/").partition("/")
            if not sep or not name:
                raise SmileError(f"{base / file}:{n}: expected '<category>/<file>', got {line!r}")
            entries.append((category, line.replace("\\", "/")))
        lists[split] = entries
    classes = sorted({c for entries in lists.values() for c, _ in entries})
    index = {c: i for i, c in enumerate(classes)}
    parts = {split: (FileImages([base / "Images" / rel for _, rel in entries]), [index[c] for c, _ in entries])
             for split, entries in lists.items()}
    return Catalog(NAME, base, classes, *parts["train"], *parts["test"])


def mit_indoor67_target(config: Config, cache_dir: str | Path | None = None) -> ImageTask:
    return image_task(config, catalog(config.data_root))


MIT_INDOOR67 = DatasetSpec(target=mit_indoor67_target)
