"""The image datasets' loaders on fixture trees in their native layouts
(``tests/native_layouts.py``), with their traps, and their one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import native_layouts as nl
from smile_ray.config import make_config
from smile_ray.data import build_task
from smile_ray.data import cifar100, cub200, fgvc_aircraft, food101, image_folder, mit_indoor67, oxford_flowers102
from smile_ray.data import stanford_cars, stanford_dogs
from smile_ray.errors import SmileError
from smile_ray.registry import DATASETS

IMAGE_DATASETS = ("cub200", "stanford_cars", "fgvc_aircraft", "mit_indoor67", "stanford_dogs",
                  "oxford_flowers102", "cifar100", "image_folder", "food101")


def config(dataset, root, **values):
    return make_config({"dataset": dataset, "data_root": str(root), "backbone": "resnet18", "weights": "none",
                        "image_size": 16, "data_workers": 0, "samples_per_class": 1, **values})


def decoded_labels(source, labels):
    """The class each image of a catalog split shows (fixture colours) next to its label."""
    return [nl.read_label(np.asarray(source.open(i).convert("RGB"))) for i in range(len(source))], list(labels)


def assert_labels_match_pixels(cat):
    for split in ("train", "test"):
        shown, labels = decoded_labels(getattr(cat, split), getattr(cat, f"{split}_labels"))
        assert shown == labels, split


def test_every_dataset_is_registered():
    assert set(IMAGE_DATASETS) <= set(DATASETS.names())
    for name in IMAGE_DATASETS:
        assert DATASETS.get(name).source is None  # no source task: ImageNet or a weight file


def test_cub200(tmp_path):
    nl.write_cub(tmp_path, classes=4, train=8, test=3)
    for root in (tmp_path, tmp_path / "CUB_200_2011"):  # the archive's folder or its parent
        cat = cub200.catalog(str(root))
        assert cat.classes == ["001.Bird_0", "002.Bird_1", "003.Bird_2", "004.Bird_3"]
        assert len(cat.train) == 32 and len(cat.test) == 12
        assert np.bincount(cat.train_labels).tolist() == [8] * 4  # class_id 1..4 -> labels 0..3
        assert_labels_match_pixels(cat)


def test_stanford_cars_devkit_single_record_and_the_trap_name(tmp_path):
    nl.write_cars_devkit(tmp_path, classes=3, train=6)
    cat = stanford_cars.catalog(str(tmp_path))
    assert cat.classes == nl.cars_names(3) and cat.classes[1] == nl.CARS_TRAP
    assert np.bincount(cat.train_labels).tolist() == [6, 6, 6]
    assert len(cat.test) == 1 and cat.test_labels.tolist() == [2]  # one record, squeezed to a scalar by loadmat
    assert_labels_match_pixels(cat)
    # the test annotations may also sit in devkit/
    (tmp_path / stanford_cars.TEST_ANNOS).rename(tmp_path / "devkit" / stanford_cars.TEST_ANNOS)
    assert stanford_cars.catalog(str(tmp_path)).test_labels.tolist() == [2]


def test_stanford_cars_class_folders_are_never_matched_to_cars_meta(tmp_path):
    folders = nl.write_cars_folders(tmp_path, classes=3)
    cat = stanford_cars.catalog(str(tmp_path))
    assert cat.classes == folders and "Ram C-V Cargo Van Minivan 2012" in cat.classes
    assert_labels_match_pixels_by_name(cat, folders)


def assert_labels_match_pixels_by_name(cat, folders):
    # folder order (sorted) is not the generation order: compare through the names
    made = [n.replace("/", "-") for n in nl.cars_names(len(folders))]
    shown, labels = decoded_labels(cat.train, cat.train_labels)
    assert [made[s] for s in shown] == [cat.classes[label] for label in labels]


def test_fgvc_aircraft_names_with_spaces(tmp_path):
    nl.write_aircraft(tmp_path, trainval=6, test=2)
    for root in (tmp_path, tmp_path / "fgvc-aircraft-2013b", tmp_path / "fgvc-aircraft-2013b" / "data"):
        cat = fgvc_aircraft.catalog(str(root))
        assert cat.classes == nl.AIRCRAFT_VARIANTS  # line order; "Cessna 172" kept whole
        assert np.bincount(cat.train_labels).tolist() == [6] * 4 and np.bincount(cat.test_labels).tolist() == [2] * 4
    assert_labels_match_pixels(cat)


def test_fgvc_aircraft_unknown_variant(tmp_path):
    base = nl.write_aircraft(tmp_path)
    path = base / "images_variant_test.txt"
    path.write_text(path.read_text().replace("Cessna 172", "Cessna 999"))
    with pytest.raises(SmileError, match=r"images_variant_test.txt: variant 'Cessna 999'"):
        fgvc_aircraft.catalog(str(tmp_path))


def test_mit_indoor67_windows_line_ends_and_sorted_labels(tmp_path):
    nl.write_indoor(tmp_path, train=5, test=2)
    assert b"\r\n" in (tmp_path / "TrainImages.txt").read_bytes()
    cat = mit_indoor67.catalog(str(tmp_path))
    assert cat.classes == sorted(nl.INDOOR)
    assert all(not p.endswith("\r") for p in cat.train.paths)
    assert np.bincount(cat.train_labels).tolist() == [5, 5, 5]
    assert_labels_match_pixels(cat)


def test_stanford_dogs_mat_lists(tmp_path):
    nl.write_dogs(tmp_path, train=5)
    cat = stanford_dogs.catalog(str(tmp_path))
    assert cat.classes == ["Chihuahua", "Japanese_spaniel", "Maltese_dog"]
    assert np.bincount(cat.train_labels).tolist() == [5, 5, 5]
    assert cat.test_labels.tolist() == [2] and len(cat.test) == 1  # single-record list
    assert_labels_match_pixels(cat)


def test_oxford_flowers102_ids_are_one_based(tmp_path):
    ids = nl.write_flowers(tmp_path, classes=3, per_class=8)
    cat = oxford_flowers102.catalog(str(tmp_path))
    assert cat.classes == ["1", "2", "3"]
    assert len(cat.train) == len(ids["trnid"]) + len(ids["valid"]) and len(cat.test) == 1
    assert cat.test.paths[0].endswith(f"image_{int(ids['tstid'][0]):05d}.jpg")
    assert cat.test_labels.tolist() == [int(ids["labels"][ids["tstid"][0] - 1]) - 1]
    assert_labels_match_pixels(cat)


def test_cifar100_pickles(tmp_path):
    nl.write_cifar(tmp_path, per_class=6, test_per_class=2)
    cat = cifar100.catalog(str(tmp_path))
    assert cat.classes == nl.CIFAR_NAMES
    assert np.bincount(cat.train_labels).tolist() == [6, 6, 6] and len(cat.test) == 6
    assert np.asarray(cat.train.open(0)).shape == (32, 32, 3)
    assert_labels_match_pixels(cat)  # R, G, B planes put back in place
    assert cifar100.catalog(str(tmp_path / "cifar-100-python")) is cat  # decoded once per root


def test_cifar100_refuses_pickles_that_run_code(tmp_path):
    import os
    import pickle

    base = tmp_path / "cifar-100-python"
    base.mkdir()

    class Hostile:
        def __reduce__(self):
            return (os.system, ("true",))

    for name in ("train", "test", "meta"):
        (base / name).write_bytes(pickle.dumps({"fine_label_names": Hostile()}, protocol=2))
    cifar100._load.cache_clear()
    with pytest.raises(SmileError, match=r"meta is not a readable CIFAR pickle .*refusing"):
        cifar100.catalog(str(tmp_path))


def test_image_folder(tmp_path):
    nl.write_image_folder(tmp_path, train=6, test=2)
    cat = image_folder.folder_catalog(tmp_path, "image_folder", image_folder.LAYOUT)
    assert cat.classes == nl.FOLDER_CLASSES
    assert len(cat.train) == 18 and len(cat.test) == 6  # notes.txt and the hidden file left out
    assert_labels_match_pixels(cat)
    (tmp_path / "test" / "zebra").mkdir()
    with pytest.raises(SmileError, match=r"test/zebra is a class that .*train lacks"):
        build_task(config("image_folder", tmp_path))


def test_food101_native_layout_through_torchvision(tmp_path):
    nl.write_food101(tmp_path, train=4, test=2)
    for root in (tmp_path, tmp_path / "food-101"):  # the archive's folder or its parent
        cat = food101.catalog(str(root))
        assert cat.classes == nl.FOOD_CLASSES  # classes.txt's order, whatever the JSON's key order
        assert len(cat.train) == 12 and len(cat.test) == 6
        assert np.bincount(cat.train_labels).tolist() == [4, 4, 4]
        assert all(p.endswith(".jpg") and "/food-101/images/" in p for p in cat.train.paths)
        assert_labels_match_pixels(cat)  # the image pipeline decodes the paths torchvision listed


def test_food101_refuses_metadata_that_disagree(tmp_path):
    import json

    base = nl.write_food101(tmp_path)
    with open(base / "meta" / "train.txt", "a") as f:
        f.write("apple_pie/99\n")
    with pytest.raises(SmileError, match=r"train.txt and train.json list different images \('apple_pie/99' is only in"):
        food101.catalog(str(tmp_path))
    base = nl.write_food101(tmp_path / "b")
    table = json.loads((base / "meta" / "test.json").read_text())
    table["pizza"] = table.pop("apple_pie")
    (base / "meta" / "test.json").write_text(json.dumps(table))
    with pytest.raises(SmileError, match=r"class 'pizza' of .*test.json is not in .*classes.txt"):
        food101.catalog(str(tmp_path / "b"))
    (base / "meta" / "test.json").write_text("{not json")
    with pytest.raises(SmileError, match=r"test.json is not readable JSON"):
        food101.catalog(str(tmp_path / "b"))
    renamed = tmp_path / "c" / "food"
    renamed.parent.mkdir()
    nl.write_food101(tmp_path / "c")
    (tmp_path / "c" / "food-101").rename(renamed)
    with pytest.raises(SmileError, match=r"is not named food-101; expected food-101/"):
        food101.catalog(str(renamed))


@pytest.mark.parametrize("dataset", IMAGE_DATASETS)
def test_a_missing_root_names_it_and_the_layout(tmp_path, dataset):
    with pytest.raises(SmileError) as err:
        build_task(config(dataset, tmp_path / "nowhere"))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message and "expected" in message
    with pytest.raises(SmileError, match="set data_root to the folder holding"):
        build_task(config(dataset, ""))


@pytest.mark.parametrize("dataset, write, remove", [
    ("cub200", nl.write_cub, "CUB_200_2011/train_test_split.txt"),
    ("stanford_cars", nl.write_cars_devkit, "devkit/cars_meta.mat"),
    ("stanford_cars", nl.write_cars_devkit, "cars_test_annos_withlabels.mat"),
    ("fgvc_aircraft", nl.write_aircraft, "fgvc-aircraft-2013b/data/images_variant_trainval.txt"),
    ("mit_indoor67", nl.write_indoor, "TestImages.txt"),
    ("stanford_dogs", nl.write_dogs, "test_list.mat"),
    ("oxford_flowers102", nl.write_flowers, "imagelabels.mat"),
    ("cifar100", nl.write_cifar, "cifar-100-python/test"),
    ("image_folder", nl.write_image_folder, "test"),
    ("food101", nl.write_food101, "food-101/meta/test.json"),
    ("food101", nl.write_food101, "food-101/meta/classes.txt"),
    ("food101", nl.write_food101, "food-101/images"),
])
def test_a_missing_metadata_file_names_it_and_the_layout(tmp_path, dataset, write, remove):
    import shutil

    write(tmp_path)
    path = tmp_path / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    cifar100._load.cache_clear()
    with pytest.raises(SmileError) as err:
        build_task(config(dataset, tmp_path))
    message = str(err.value)
    assert "\n" not in message and f"missing {path}" in message and "expected" in message, message


def test_malformed_lines_name_file_and_line(tmp_path):
    base = nl.write_cub(tmp_path)
    with open(base / "images.txt", "a") as f:
        f.write("lonely\n")
    with pytest.raises(SmileError, match=r"images.txt:\d+: expected '<image_id> <path>', got 'lonely'"):
        cub200.catalog(str(tmp_path))


def test_a_corrupt_mat_file(tmp_path):
    nl.write_dogs(tmp_path)
    (tmp_path / "train_list.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(SmileError, match=r"train_list.mat is not a readable MATLAB file"):
        stanford_dogs.catalog(str(tmp_path))


def test_a_full_task_per_dataset(tmp_path):
    for name, write in (("cub200", nl.write_cub), ("stanford_cars", nl.write_cars_devkit),
                        ("fgvc_aircraft", nl.write_aircraft), ("mit_indoor67", nl.write_indoor),
                        ("stanford_dogs", nl.write_dogs), ("oxford_flowers102", nl.write_flowers),
                        ("cifar100", nl.write_cifar), ("image_folder", nl.write_image_folder),
                        ("food101", nl.write_food101)):
        root = tmp_path / name
        root.mkdir()
        write(root)
        task = build_task(config(name, root, samples_per_class=2))
        x, y = task.train_batch(0, 4)
        assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
        assert task.split_sizes()["train"] == 2 * task.num_classes
        assert task.classes and len(task.classes) == task.num_classes


def test_empty_splits_are_refused_before_training(tmp_path):
    nl.write_image_folder(tmp_path, train=2, test=1)
    for name in nl.FOLDER_CLASSES:
        (tmp_path / "test" / name / "0.png").unlink()
    with pytest.raises(SmileError, match=r"image_folder: no test images of the kept classes under"):
        build_task(config("image_folder", tmp_path))
