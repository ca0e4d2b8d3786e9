"""``cub200``: Caltech-UCSD Birds-200-2011 (200 species, 5,994 training and 5,794 test
images), read from the archive's own files. ``data_root`` is the folder holding
``CUB_200_2011/`` (or that folder itself)::

    CUB_200_2011/
      images/<class folder>/<file>.jpg
      images.txt               "<image_id> <path under images/>"
      image_class_labels.txt   "<image_id> <class_id 1..200>"
      train_test_split.txt     "<image_id> <1 train | 0 test>"
      classes.txt              "<class_id> <name>"

Label = class_id - 1; class names as ``classes.txt`` gives them (``001.Black_footed_Albatross``).
Validation is held out from the training images; the paper's subsets and the image
pipeline are :mod:`smile_ray.data.images`'.
"""
from __future__ import annotations

from pathlib import Path

from smile_ray.config import Config
from smile_ray.data.task import DatasetSpec
from smile_ray.data.catalog import Catalog, FileImages, dataset_root, find_base, split_pairs, to_int
from smile_ray.data.images import ImageTask, image_task
from smile_ray.errors import SmileError

NAME = "cub200"
LAYOUT = ("CUB_200_2011/ with images/<class>/<file>.jpg, images.txt, image_class_labels.txt, "
          "train_test_split.txt and classes.txt (the CUB-200-2011 archive)")


def catalog(data_root: str) -> Catalog:
    base = find_base(dataset_root(data_root, NAME, LAYOUT), "images.txt", ("CUB_200_2011",))
    classes = split_pairs(base / "classes.txt", NAME, LAYOUT, "<class_id> <name>")
    class_ids = [to_int(i, base / "classes.txt", "class id") for i, _ in classes]
    if sorted(class_ids) != list(range(1, len(class_ids) + 1)):
        raise SmileError(f"{base / 'classes.txt'}: class ids are not 1..{len(class_ids)}")
    names = [name for _, name in sorted(zip(class_ids, (n for _, n in classes)))]
    paths = dict(split_pairs(base / "images.txt", NAME, LAYOUT, "<image_id> <path>"))
    labels = dict(split_pairs(base / "image_class_labels.txt", NAME, LAYOUT, "<image_id> <class_id>"))
    is_train = dict(split_pairs(base / "train_test_split.txt", NAME, LAYOUT, "<image_id> <1|0>"))
    split: dict[str, tuple[list, list]] = {"1": ([], []), "0": ([], [])}
    for image_id, path in sorted(paths.items(), key=lambda kv: to_int(kv[0], base / "images.txt", "image id")):
        for table, file in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if image_id not in table:
                raise SmileError(f"{base / file}: no line for image {image_id} ({path})")
        flag = is_train[image_id]
        if flag not in split:
            raise SmileError(f"{base / 'train_test_split.txt'}: image {image_id} is marked {flag!r}, not 1 or 0")
        split[flag][0].append(base / "images" / path)
        split[flag][1].append(to_int(labels[image_id], base / "image_class_labels.txt", "class id") - 1)
    (train, train_labels), (test, test_labels) = split["1"], split["0"]
    return Catalog(NAME, base, names, FileImages(train), train_labels, FileImages(test), test_labels)


def cub200_target(config: Config, cache_dir: str | Path | None = None) -> ImageTask:
    return image_task(config, catalog(config.data_root))


CUB200 = DatasetSpec(target=cub200_target)
