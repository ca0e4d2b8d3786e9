"""Fixture trees in the image datasets' native layouts (shared/DATASETS.md, section 2):
tiny generated JPEG/PNG images, metadata in exactly the published formats, including
their traps (names with spaces, a Cars class that is no valid folder name, single-record
``.mat`` files, Windows line ends, 1-based labels).

Every image is a solid colour that encodes its class (``colour(label)``) with a
left-to-right ramp in the green channel, so a test can read a decoded image's class
back and see whether it was flipped.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from scipy.io import savemat

CARS_TRAP = "Ram C/V Cargo Van Minivan 2012"  # cars_meta's name that cannot be a folder


def colour(label: int) -> tuple[int, int]:
    """(red, blue) of the images of class ``label``."""
    return 30 + 50 * (label % 5), 30 + 50 * (label // 5 % 5)


def image(label: int, size: tuple[int, int] = (16, 12)) -> np.ndarray:
    w, h = size
    x = np.zeros((h, w, 3), dtype=np.uint8)
    r, b = colour(label)
    x[..., 0], x[..., 2] = r, b
    x[..., 1] = np.linspace(0, 255, w).astype(np.uint8)[None, :]  # dark left, bright right
    return x


def write_image(path: Path, label: int, size: tuple[int, int] = (16, 12)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(image(label, size))
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.save(path, quality=95)
    else:
        im.save(path)
    return path


def read_label(x: np.ndarray) -> int:
    """The class of a decoded (H, W, 3) uint8 image written by :func:`image`."""
    r, b = x[..., 0].mean(), x[..., 2].mean()
    return int(round((r - 30) / 50)) + 5 * int(round((b - 30) / 50))


def write_cub(root: Path, classes: int = 4, train: int = 8, test: int = 3) -> Path:
    base = root / "CUB_200_2011"
    images, labels, split, names = [], [], [], []
    image_id = 0
    for c in range(classes):
        folder = f"{c + 1:03d}.Bird_{c}"
        names.append(f"{c + 1} {folder}")
        for k in range(train + test):
            image_id += 1
            rel = f"{folder}/Bird_{c}_{k:04d}.jpg"
            write_image(base / "images" / rel, c)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {1 if k < train else 0}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("classes.txt", names)):
        (base / name).write_text("\n".join(lines) + "\n")
    return base


def _struct(records: list[dict]) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    arr = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, r in enumerate(records):
        for f in fields:
            arr[0, i][f] = r[f]
    return arr


def cars_names(classes: int) -> list[str]:
    return [CARS_TRAP if c == 1 else f"Car Model {c} 2012" for c in range(classes)]


def write_cars_devkit(root: Path, classes: int = 3, train: int = 6) -> Path:
    """Training images of every class; one test record only (a single-record .mat)."""
    names = cars_names(classes)
    cell = np.empty((1, classes), dtype=object)
    cell[0, :] = names
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": cell})
    records, n = [], 0
    for c in range(classes):
        for _ in range(train):
            n += 1
            write_image(root / "cars_train" / f"{n:05d}.jpg", c)
            records.append({"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 10, "bbox_y2": 8, "class": c + 1,
                            "fname": f"{n:05d}.jpg"})
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _struct(records)})
    write_image(root / "cars_test" / "00001.jpg", classes - 1)
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _struct([
        {"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 10, "bbox_y2": 8, "class": classes, "fname": "00001.jpg"}])})
    return root


def write_cars_folders(root: Path, classes: int = 3, train: int = 4, test: int = 2) -> list[str]:
    folders = [n.replace("/", "-") for n in cars_names(classes)]
    for c, folder in enumerate(folders):
        for k in range(train):
            write_image(root / "train" / folder / f"{k:05d}.jpg", c)
        for k in range(test):
            write_image(root / "test" / folder / f"{k:05d}.jpg", c)
    return sorted(folders)


AIRCRAFT_VARIANTS = ["707-320", "Cessna 172", "DHC-1", "F/A-18"]


def write_aircraft(root: Path, trainval: int = 6, test: int = 2) -> Path:
    base = root / "fgvc-aircraft-2013b" / "data"
    base.mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(AIRCRAFT_VARIANTS) + "\n")
    lines = {"trainval": [], "test": []}
    n = 1000000
    for c, variant in enumerate(AIRCRAFT_VARIANTS):
        for k in range(trainval + test):
            n += 1
            write_image(base / "images" / f"{n:07d}.jpg", c)
            lines["trainval" if k < trainval else "test"].append(f"{n:07d} {variant}")
    for split, rows in lines.items():
        (base / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
    return base


INDOOR = ["kitchen", "airport_inside", "bar"]  # label = sorted position: airport_inside 0, bar 1, kitchen 2


def write_indoor(root: Path, train: int = 5, test: int = 2) -> Path:
    lists = {"TrainImages.txt": [], "TestImages.txt": []}
    for category in INDOOR:
        label = sorted(INDOOR).index(category)
        for k in range(train + test):
            rel = f"{category}/img_{k}.jpg"
            write_image(root / "Images" / rel, label)
            lists["TrainImages.txt" if k < train else "TestImages.txt"].append(rel)
    for name, rows in lists.items():  # the published lists end their lines with \r\n
        (root / name).write_bytes(("\r\n".join(rows) + "\r\n").encode())
    return root


DOGS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]


def _cell(items: list[str]) -> np.ndarray:
    cell = np.empty((len(items), 1), dtype=object)
    cell[:, 0] = items
    return cell


def write_dogs(root: Path, train: int = 5) -> Path:
    """A single test image (single-record lists)."""
    files, labels = [], []
    for c, folder in enumerate(DOGS):
        for k in range(train):
            rel = f"{folder}/{folder.split('-')[0]}_{k}.jpg"
            write_image(root / "Images" / rel, c)
            files.append(rel)
            labels.append(c + 1)
    savemat(root / "train_list.mat", {"file_list": _cell(files), "labels": np.array(labels, float)[:, None]})
    rel = f"{DOGS[2]}/test_0.jpg"
    write_image(root / "Images" / rel, 2)
    savemat(root / "test_list.mat", {"file_list": _cell([rel]), "labels": np.array([[3.0]])})
    return root


def write_flowers(root: Path, classes: int = 3, per_class: int = 8) -> dict[str, np.ndarray]:
    n = classes * per_class
    labels = np.arange(n) % classes + 1  # 1-based, image i+1 has labels[i]
    for i in range(n):
        write_image(root / "jpg" / f"image_{i + 1:05d}.jpg", int(labels[i]) - 1)
    ids = np.arange(1, n + 1)
    trn, val, tst = ids[: n // 2], ids[n // 2: n - 1], ids[n - 1:]  # tstid: one id (squeezes to a scalar)
    savemat(root / "imagelabels.mat", {"labels": labels[None, :].astype(float)})
    savemat(root / "setid.mat", {"trnid": trn[None, :], "valid": val[None, :], "tstid": tst[None, :]})
    return {"labels": labels, "trnid": trn, "valid": val, "tstid": tst}


CIFAR_NAMES = ["apple", "aquarium_fish", "baby"]


def write_cifar(root: Path, per_class: int = 6, test_per_class: int = 2) -> Path:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for split, count in (("train", per_class), ("test", test_per_class)):
        labels = [c for c in range(len(CIFAR_NAMES)) for _ in range(count)]
        data = np.stack([image(c, (32, 32)).transpose(2, 0, 1).reshape(-1) for c in labels])
        with open(base / split, "wb") as f:  # what Python 2 wrote: byte-string keys
            pickle.dump({b"data": data.astype(np.uint8), b"fine_labels": labels,
                         b"coarse_labels": [0] * len(labels), b"batch_label": b"training batch 1 of 1"}, f, protocol=2)
    with open(base / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in CIFAR_NAMES], b"coarse_label_names": [b"x"]}, f,
                    protocol=2)
    return base


FOLDER_CLASSES = ["cat", "dog", "owl"]


def write_image_folder(root: Path, train: int = 6, test: int = 2, suffix: str = ".png",
                       size: tuple[int, int] = (16, 12)) -> Path:
    for c, name in enumerate(FOLDER_CLASSES):
        for k in range(train):
            write_image(root / "train" / name / f"{k}{suffix}", c, size)
        for k in range(test):
            write_image(root / "test" / name / f"{k}{suffix}", c, size)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored: not an image name
    (root / "train" / "dog" / ".hidden.png").write_bytes(b"")  # ignored: hidden
    return root


FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "beef_carpaccio"]


def write_food101(root: Path, train: int = 4, test: int = 2) -> Path:
    """``food-101/`` as the archive unpacks: images under their class, ``meta/`` with the
    class list, display names and both splits as ``.txt`` and ``.json``. The ``.json``
    keys are written in reverse class order (a JSON object's order is no label order)."""
    import json

    base = root / "food-101"
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    image_id = 1000
    for c, name in enumerate(FOOD_CLASSES):
        for split, count in (("train", train), ("test", test)):
            for _ in range(count):
                image_id += 7
                write_image(base / "images" / name / f"{image_id}.jpg", c, (20, 14))
                splits[split].setdefault(name, []).append(f"{name}/{image_id}")
    meta = base / "meta"
    meta.mkdir(parents=True)
    (meta / "classes.txt").write_text("\n".join(FOOD_CLASSES) + "\n")
    (meta / "labels.txt").write_text("\n".join(n.replace("_", " ").capitalize() for n in FOOD_CLASSES) + "\n")
    for split, table in splits.items():
        (meta / f"{split}.json").write_text(json.dumps({k: table[k] for k in reversed(FOOD_CLASSES)}))
        (meta / f"{split}.txt").write_text("\n".join(p for k in FOOD_CLASSES for p in table[k]) + "\n")
    return base
