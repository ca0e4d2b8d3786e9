"""``image_folder``: any dataset laid out as one folder per class (the layout the SMILE
and RIFLE reference codes read)::

    train/<class>/<image>      (*.jpg, *.jpeg, *.png, *.bmp, *.gif, *.ppm, *.pgm, *.tif, *.tiff, *.webp)
    test/<class>/<image>

Classes are the sorted names of ``train/``'s sub-folders (label = position); ``test/``
may lack a class but may not add one. Hidden files and other files are ignored.
Validation is held out from ``train/`` (``val_fraction``); the paper's subsets and the
image pipeline are :mod:`smile_ray.data.images`'.
"""
from __future__ import annotations

from pathlib import Path

from smile_ray.config import Config
from smile_ray.data.task import DatasetSpec
from smile_ray.data.catalog import Catalog, FileImages, class_folders, dataset_root, images_in, need
from smile_ray.data.images import ImageTask, image_task
from smile_ray.errors import SmileError

NAME = "image_folder"
LAYOUT = "train/<class>/<image> and test/<class>/<image> (one folder per class)"


def folder_catalog(base: Path, dataset: str, layout: str) -> Catalog:
    """The catalog of ``base/train/<class>/*`` and ``base/test/<class>/*``."""
    classes = class_folders(need(base / "train", dataset, layout))
    if not classes:
        raise SmileError(f"{dataset}: {base / 'train'} has no class folders; expected {layout}")
    test_classes = class_folders(need(base / "test", dataset, layout))
    extra = sorted(set(test_classes) - set(classes))
    if extra:
        raise SmileError(f"{dataset}: {base / 'test' / extra[0]} is a class that {base / 'train'} lacks")
    parts = {}
    for split, names in (("train", classes), ("test", test_classes)):
        files, labels = [], []
        for name in names:
            found = images_in(base / split / name)
            files += found
            labels += [classes.index(name)] * len(found)
        parts[split] = (FileImages(files), labels)
    return Catalog(dataset, base, classes, *parts["train"], *parts["test"])


def image_folder_target(config: Config, cache_dir: str | Path | None = None) -> ImageTask:
    return image_task(config, folder_catalog(dataset_root(config.data_root, NAME, LAYOUT), NAME, LAYOUT))


IMAGE_FOLDER = DatasetSpec(target=image_folder_target)
