"""``food101``: Food-101 (101 dishes, 75,750 training and 25,250 test images, 750 and 250
per class), read from the archive's own files through torchvision's
:class:`~torchvision.datasets.Food101`. ``data_root`` is the folder holding
``food-101/`` (or ``food-101/`` itself)::

    food-101/
      images/<class>/<id>.jpg
      meta/classes.txt          one class identifier per line (apple_pie, ...); label = line order
      meta/labels.txt           the same classes' display names (Apple pie, ...), same order
      meta/train.json           {"<class>": ["<class>/<id>", ...], ...}  (what torchvision reads)
      meta/test.json
      meta/train.txt            "<class>/<id>" per line: the same images as the .json
      meta/test.txt

torchvision reads the split's ``.json`` (labels: its keys sorted) and, given
``loader=``, hands each image to it instead of decoding it: the loader here returns the
path, so the catalog holds file paths and :mod:`smile_ray.data.images` decodes, as for
every other file dataset (PIL ``draft``, keyed augmentation, ``decode: device``). The
labels are then mapped to ``classes.txt``'s order (alphabetical in the archive, so the
same numbers), the ``.json`` classes are checked against ``classes.txt``, and where a
split's ``.txt`` exists it must list the same images as its ``.json`` (a half-extracted
or edited archive is refused with one line naming the file).

The paper trains Food-101 on an ImageNet EfficientNet-B4 at sampling rates 30/50/100 %
(``sample_rate``); validation is held out from the training images first. The training
images were not cleaned by the dataset's authors (some wrong labels), as the paper
used them.
"""
from __future__ import annotations

from pathlib import Path

from smile_ray.config import Config
from smile_ray.data.task import DatasetSpec
from smile_ray.data.catalog import Catalog, FileImages, dataset_root, find_base, need, read_lines
from smile_ray.data.images import ImageTask, image_task
from smile_ray.errors import SmileError

NAME = "food101"
LAYOUT = ("food-101/ with images/<class>/<id>.jpg and meta/classes.txt, labels.txt, train.json, test.json "
          "(train.txt, test.txt) (the Food-101 archive)")


def _path_only(path):
    """torchvision's ``loader=``: no decoding here, the image pipeline decodes."""
    return str(path)


def _split(base: Path, split: str, classes: list[str]) -> tuple[list[str], list[int]]:
    from torchvision.datasets import Food101

    need(base / "meta" / f"{split}.json", NAME, LAYOUT)
    try:
        ds = Food101(str(base.parent), split=split, loader=_path_only)
        items = [ds[i] for i in range(len(ds))]
    except ValueError as e:  # json.JSONDecodeError among them
        raise SmileError(f"{NAME}: {base / 'meta' / f'{split}.json'} is not readable JSON ({e})") from None
    except (AttributeError, TypeError, KeyError) as e:
        raise SmileError(f"{NAME}: {base / 'meta' / f'{split}.json'} is not a mapping of class to image list "
                         f"({e.__class__.__name__})") from None
    unknown = sorted(set(ds.classes) - set(classes))
    if unknown:
        raise SmileError(f"{NAME}: class {unknown[0]!r} of {base / 'meta' / f'{split}.json'} is not in "
                         f"{base / 'meta' / 'classes.txt'}")
    index = {c: i for i, c in enumerate(classes)}
    paths = [p for p, _ in items]
    labels = [index[ds.classes[label]] for _, label in items]
    listed = base / "meta" / f"{split}.txt"
    if listed.exists():
        names = {line for _, line in read_lines(listed, NAME, LAYOUT)}
        in_json = {str(Path(p).relative_to(base / "images").with_suffix("").as_posix()) for p in paths}
        if names != in_json:
            odd = sorted(names ^ in_json)[0]
            where = listed if odd in names else base / "meta" / f"{split}.json"
            raise SmileError(f"{NAME}: {listed} and {split}.json list different images ({odd!r} is only in {where})")
    return paths, labels


def catalog(data_root: str) -> Catalog:
    base = find_base(dataset_root(data_root, NAME, LAYOUT), "meta", ("food-101",))
    need(base / "meta" / "classes.txt", NAME, LAYOUT)
    need(base / "images", NAME, LAYOUT)
    if base.name != "food-101":  # torchvision reads <root>/food-101/, as the archive unpacks
        raise SmileError(f"{NAME}: {base} holds the files but is not named food-101; expected {LAYOUT}")
    classes = [line for _, line in read_lines(base / "meta" / "classes.txt", NAME, LAYOUT)]
    parts = {split: _split(base, split, classes) for split in ("train", "test")}
    return Catalog(NAME, base, classes, FileImages(parts["train"][0]), parts["train"][1],
                   FileImages(parts["test"][0]), parts["test"][1])


def food101_target(config: Config, cache_dir: str | Path | None = None) -> ImageTask:
    return image_task(config, catalog(config.data_root))


FOOD101 = DatasetSpec(target=food101_target)
