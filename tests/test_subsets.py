"""The paper's subsets (C:X/N:Y) as config keys, and the validation hold-out they never touch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import native_layouts as nl
from smile_ray.config import make_config
from smile_ray.data import build_task
from smile_ray.data.subsets import holdout, kept_classes
from smile_ray.errors import SmileError

CLASSES, TRAIN, TEST = 6, 10, 2  # CUB fixture: 10 training images per class -> 1 validation, 9 in the pool


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub")
    nl.write_cub(root, classes=CLASSES, train=TRAIN, test=TEST)
    return root


def task(root, **values):
    return build_task(make_config({"dataset": "cub200", "data_root": str(root), "backbone": "resnet18",
                                   "weights": "none", "image_size": 16, "data_workers": 0, **values}))


def names(t, split):
    source, labels = t.sources[split]
    return [source.name(i) for i in range(len(source))], labels.tolist()


def class_of(path):
    return path.split("/images/")[1].split("/")[0]


@pytest.mark.parametrize("values, fragment", [
    ({"train_images": 400, "sample_rate": 0.15}, "train_images=400 and sample_rate=0.15 are exclusive"),
    ({"class_fraction": 0}, "class_fraction=0.0 is out of range"),
    ({"class_fraction": 1.5}, "class_fraction=1.5 is out of range"),
    ({"sample_rate": 1.5}, "sample_rate=1.5 is out of range"),
    ({"train_images": -1}, "train_images=-1 is out of range"),
    ({"val_fraction": 0}, "val_fraction=0.0 is out of range"),
    ({"val_fraction": 1}, "val_fraction=1.0 is out of range"),
    ({"data_workers": -2}, "data_workers=-2 is out of range"),
    ({"skip_bad_images": "perhaps"}, "skip_bad_images='perhaps' is not a valid bool"),
])
def test_bad_subset_keys_name_the_key(values, fragment):
    with pytest.raises(SmileError) as err:
        make_config(values)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_defaults_leave_the_old_behaviour():
    c = make_config()
    assert (c.class_fraction, c.train_images, c.sample_rate, c.samples_per_class) == (1.0, 0, 0.0, 5)
    assert (c.val_fraction, c.data_workers, c.skip_bad_images) == (0.1, -1, False)
    assert kept_classes(200, c).tolist() == list(range(200))


def test_class_fraction_is_a_seeded_choice_and_cuts_every_split(cub):
    a = task(cub, class_fraction=0.5, seed=1)
    assert a.num_classes == 3 and len(a.classes) == 3 and a.classes == sorted(a.classes)
    assert task(cub, class_fraction=0.5, seed=1).classes == a.classes
    others = {tuple(task(cub, class_fraction=0.5, seed=s).classes) for s in range(2, 8)}
    assert len(others | {tuple(a.classes)}) > 1  # the seed chooses
    for split in ("train", "val", "test"):
        paths, labels = names(a, split)
        assert sorted(set(labels)) == [0, 1, 2]
        assert all(a.classes[label] == class_of(p) for p, label in zip(paths, labels))  # renumbered in class order
    assert a.split_sizes() == {"train": 3 * 5, "val": 3, "test": 3 * TEST}  # samples_per_class 5 of each


def test_paper_settings(cub):
    # C:50%/N:7 -> 3 classes, 7 images: 3 + 2 + 2 (one more for 7 % 3 = 1 class chosen by seed)
    t = task(cub, class_fraction=0.5, train_images=7, seed=3)
    counts = torch.bincount(t.train_labels(), minlength=3).tolist()
    assert sum(counts) == 7 and sorted(counts) == [2, 2, 3]
    # N:50%: round(0.5 * 9) = 5 of each class's 9 pool images (half up)
    t = task(cub, sample_rate=0.5)
    assert torch.bincount(t.train_labels()).tolist() == [5] * CLASSES
    # N:100%: the whole pool, every training image but the held-out ones
    t = task(cub, sample_rate=1.0)
    assert t.split_sizes() == {"train": 9 * CLASSES, "val": CLASSES, "test": TEST * CLASSES}
    train, _ = names(t, "train")
    assert len(set(train)) == len(train)


def test_validation_is_fixed_and_never_trained_on(cub):
    full = task(cub, sample_rate=1.0)
    val = set(names(full, "val")[0])
    for values in ({"seed": 1}, {"seed": 2, "samples_per_class": 9}, {"class_fraction": 0.5, "train_images": 9},
                   {"sample_rate": 0.3, "seed": 5}):
        t = task(cub, **values)
        train, _ = names(t, "train")
        assert not set(train) & val
        kept = set(t.classes)
        assert set(names(t, "val")[0]) == {p for p in val if class_of(p) in kept}  # the same images, whatever the keys
    # the test split is the official one (never drawn from)
    assert len(names(full, "test")[0]) == TEST * CLASSES


def test_holdout_rules():
    labels = np.repeat(np.arange(4), [1, 2, 10, 30])
    val, pool = holdout(labels, [0, 1, 2, 3], 0.1)
    assert [len(v) for v in val] == [0, 1, 1, 3] and [len(p) for p in pool] == [1, 1, 9, 27]
    again, _ = holdout(labels, [3], 0.1)
    assert np.array_equal(again[0], val[3])  # a class's hold-out does not depend on the other classes


def test_subset_errors_name_the_key_and_class(cub):
    with pytest.raises(SmileError, match=r"train_images=2 is fewer than the 3 classes kept by class_fraction=0.5"):
        task(cub, class_fraction=0.5, train_images=2)
    with pytest.raises(SmileError) as err:
        task(cub, train_images=10 * CLASSES)
    assert "train_images=60 needs 10 training images of cub200 class" in str(err.value)
    assert "pool holds 9 after holding out val_fraction=0.1" in str(err.value)
    with pytest.raises(SmileError, match=r"samples_per_class=10 needs 10 training images"):
        task(cub, samples_per_class=10)


def test_the_tensor_datasets_take_the_subset_keys(tmp_path):
    from test_fashion_mnist import write_dataset

    t = build_task(make_config({"class_fraction": 0.4, "train_images": 5, "seed": 4}))  # digits: 2 of 5 classes
    assert t.num_classes == 2 and t.split_sizes()["train"] == 5 and len(t.classes) == 2
    assert set(t.splits["test"][1].tolist()) == {0, 1} and set(t.splits["val"][1].tolist()) == {0, 1}
    assert build_task(make_config()).classes == ["5", "6", "7", "8", "9"]

    write_dataset(tmp_path)
    f = build_task(make_config({"dataset": "fashion_mnist", "data_root": str(tmp_path), "class_fraction": 0.3,
                                "sample_rate": 0.25}))
    assert f.num_classes == 3 and f.split_sizes() == {"train": 3 * 5, "val": 300, "test": 15}
    with pytest.raises(SmileError, match=r"after holding out 100 per class for validation"):
        build_task(make_config({"dataset": "fashion_mnist", "data_root": str(tmp_path), "train_images": 300}))
