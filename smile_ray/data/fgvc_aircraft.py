"""``fgvc_aircraft``: FGVC-Aircraft 2013b, the 100 variants (6,667 trainval and 3,333 test
images). ``data_root`` is the folder holding ``fgvc-aircraft-2013b/`` (or that folder,
or its ``data/``)::

    fgvc-aircraft-2013b/data/
      images/<7-digit id>.jpg
      variants.txt                     one variant name per line; label = line order
      images_variant_trainval.txt      "<id> <variant name>"
      images_variant_test.txt          "<id> <variant name>"

Variant names hold spaces ("Cessna 172"): lines are split on the first space only.
The training images are the official trainval split (what the paper trains on);
validation is held out from it. The copyright banner (the bottom 20 pixel rows) is not
cropped, as in torchvision's loader.
"""
from __future__ import annotations

from pathlib import Path

from smile_ray.config import Config
from smile_ray.data.task import DatasetSpec
from smile_ray.data.catalog import Catalog, FileImages, dataset_root, find_base, read_lines, split_pairs
from smile_ray.data.images import ImageTask, image_task
from smile_ray.errors import SmileError

NAME = "fgvc_aircraft"
LAYOUT = ("fgvc-aircraft-2013b/data/ with images/<id>.jpg, variants.txt, images_variant_trainval.txt "
          "and images_variant_test.txt (the FGVC-Aircraft 2013b archive)")


def catalog(data_root: str) -> Catalog:
    base = find_base(dataset_root(data_root, NAME, LAYOUT), "variants.txt", ("data", "fgvc-aircraft-2013b/data"))
    variants = [line for _, line in read_lines(base / "variants.txt", NAME, LAYOUT)]
    index = {v: i for i, v in enumerate(variants)}
    parts = {}
    for split in ("trainval", "test"):
        path = base / f"images_variant_{split}.txt"
        files, labels = [], []
        for image_id, variant in split_pairs(path, NAME, LAYOUT, "<image id> <variant name>"):
            if variant not in index:
                raise SmileError(f"{path}: variant {variant!r} of image {image_id} is not in {base / 'variants.txt'}")
            files.append(base / "images" / f"{image_id}.jpg")
            labels.append(index[variant])
        parts[split] = (FileImages(files), labels)
    return Catalog(NAME, base, variants, *parts["trainval"], *parts["test"])


def fgvc_aircraft_target(config: Config, cache_dir: str | Path | None = None) -> ImageTask:
    return image_task(config, catalog(config.data_root))


FGVC_AIRCRAFT = DatasetSpec(target=fgvc_aircraft_target)
