"""``stanford_cars``: Stanford Cars (196 models, 8,144 training and 8,041 test images).
``data_root`` holds one of two layouts (or a ``stanford_cars/`` folder holding it):

* the devkit layout (checked first)::

    cars_train/00001.jpg ...      cars_test/00001.jpg ...
    devkit/cars_meta.mat          class_names: 1x196 cell
    devkit/cars_train_annos.mat   annotations: 1xN struct (bbox_x1, bbox_y1, bbox_x2, bbox_y2, class 1..196, fname)
    cars_test_annos_withlabels.mat   the same fields (at the top or in devkit/)

  read with ``scipy.io.loadmat(squeeze_me=True)``; a single record squeezes to a scalar
  (``np.atleast_1d`` undoes it). Label = class - 1; names from ``cars_meta``. Bounding
  boxes are not used (whole images, as the paper's reference code).
* class folders, ``train/<class name>/*`` and ``test/<class name>/*``, read as
  ``image_folder`` does: classes are the sorted folder names. The folder names are
  never matched against ``cars_meta``'s names: one of them ("Ram C/V Cargo Van Minivan
  2012") cannot be a folder name, so every copy spells that folder its own way.
"""
from __future__ import annotations

from pathlib import Path

from smile_ray.config import Config
from smile_ray.data.task import DatasetSpec
from smile_ray.data.catalog import Catalog, FileImages, dataset_root, find_base, load_mat, mat_vector
from smile_ray.data.image_folder import folder_catalog
from smile_ray.data.images import ImageTask, image_task
from smile_ray.errors import SmileError

NAME = "stanford_cars"
LAYOUT = ("cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat and "
          "cars_test_annos_withlabels.mat (the Stanford Cars devkit layout), or train/<class>/ and test/<class>/")
TEST_ANNOS = "cars_test_annos_withlabels.mat"


def _annotations(path: Path) -> tuple[list[str], list[int]]:
    ann = mat_vector(load_mat(path, NAME, LAYOUT, ["annotations"])["annotations"])
    try:
        files = [str(r["fname"]) for r in ann]
        labels = [int(r["class"]) - 1 for r in ann]
    except (ValueError, IndexError, KeyError, TypeError):
        raise SmileError(f"{NAME}: {path}: annotations lack the fields 'fname' and 'class'") from None
    return files, labels


def catalog(data_root: str) -> Catalog:
    root = dataset_root(data_root, NAME, LAYOUT)
    base = find_base(root, "devkit", ("stanford_cars",))
    if not (base / "devkit").is_dir():
        folders = find_base(root, "train", ("stanford_cars",))
        if (folders / "train").is_dir():
            return folder_catalog(folders, NAME, LAYOUT)
        raise SmileError(f"{NAME}: neither {root / 'devkit'} nor {root / 'train'} exists; expected {LAYOUT}")
    names = [str(n) for n in mat_vector(load_mat(base / "devkit" / "cars_meta.mat", NAME, LAYOUT,
                                                 ["class_names"])["class_names"])]
    train_files, train_labels = _annotations(base / "devkit" / "cars_train_annos.mat")
    test_annos = base / TEST_ANNOS
    if not test_annos.exists() and (base / "devkit" / TEST_ANNOS).exists():
        test_annos = base / "devkit" / TEST_ANNOS
    test_files, test_labels = _annotations(test_annos)
    return Catalog(NAME, base, names, FileImages([base / "cars_train" / f for f in train_files]), train_labels,
                   FileImages([base / "cars_test" / f for f in test_files]), test_labels)


def stanford_cars_target(config: Config, cache_dir: str | Path | None = None) -> ImageTask:
    return image_task(config, catalog(config.data_root))


STANFORD_CARS = DatasetSpec(target=stanford_cars_target)
