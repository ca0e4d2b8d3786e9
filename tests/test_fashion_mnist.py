"""Fashion-MNIST from its IDX files: a tiny fake dataset written in the real format, its
error messages, and (when installed) the real files."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from smile_ray.config import make_config
from smile_ray.data import build_task
from smile_ray.data import fashion_mnist as fm
from smile_ray.errors import SmileError

TRAIN_PER_CLASS, TEST_PER_CLASS = 120, 5
REAL_ROOT = Path(fm.DEFAULT_ROOT)


def write_idx(path: Path, magic: int, array: np.ndarray, count: int | None = None) -> None:
    shape = list(array.shape)
    if count is not None:
        shape[0] = count
    header = struct.pack(f">i{len(shape)}i", magic, *shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_images(n: int, test: bool, seed: int) -> np.ndarray:
    """Random 28x28 images whose first three pixels encode (index // 256, index % 256, split)."""
    x = np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    i = np.arange(n)
    x[:, 0, 0], x[:, 0, 1], x[:, 0, 2] = i // 256, i % 256, 255 if test else 0
    return x


def write_dataset(root: Path) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_labels": np.arange(10 * TRAIN_PER_CLASS) % 10,
        "test_labels": np.arange(10 * TEST_PER_CLASS) % 10,
        "train_images": fake_images(10 * TRAIN_PER_CLASS, test=False, seed=1),
        "test_images": fake_images(10 * TEST_PER_CLASS, test=True, seed=2),
    }
    write_idx(root / fm.TRAIN_IMAGES, 2051, arrays["train_images"])
    write_idx(root / fm.TRAIN_LABELS, 2049, arrays["train_labels"])
    write_idx(root / fm.TEST_IMAGES, 2051, arrays["test_images"])
    write_idx(root / fm.TEST_LABELS, 2049, arrays["test_labels"])
    return arrays


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    return root, write_dataset(root)


def task(root: Path, dataset: str = "fashion_mnist", **values):
    return build_task(make_config({"dataset": dataset, "data_root": str(root), **values}))


def decode(x: torch.Tensor, dataset: str, root: Path) -> list[tuple[bool, int]]:
    """(is_test, index) of each image of a 28 px task, inverting the normalisation."""
    if dataset == "fashion_mnist":
        u8 = x[:, 0] * 255
    else:
        data = fm.load(str(root))
        u8 = (x[:, 0] * data.std + data.mean) * 255
    u8 = u8.round().long()
    return [(bool(r[0, 2] == 255), int(r[0, 0] * 256 + r[0, 1])) for r in u8]


def test_target_splits_sizes_and_classes(fake):
    root, arrays = fake
    t = task(root, samples_per_class=7, image_size=28, seed=3)
    assert t.split_sizes() == {"train": 70, "val": 10 * fm.VAL_PER_CLASS, "test": 10 * TEST_PER_CLASS}
    assert t.num_classes == 10 and t.in_channels == 1 and t.shift == 1
    assert torch.bincount(t.splits["train"][1]).tolist() == [7] * 10
    assert torch.bincount(t.splits["val"][1]).tolist() == [fm.VAL_PER_CLASS] * 10
    for split, (x, y) in t.splits.items():
        assert x.dtype == torch.float32 and y.dtype == torch.long
        ids = decode(x, "fashion_mnist", root)
        assert all(is_test == (split == "test") for is_test, _ in ids)
        source = arrays["test_labels" if split == "test" else "train_labels"]
        assert [int(source[i]) for _, i in ids] == y.tolist()  # the label of each image is its own
    assert sorted(i for _, i in decode(t.splits["test"][0], "fashion_mnist", root)) == list(range(50))
    # raw intensities (the ImageNet backbone normalises its input): pixel 0 -> 0, 255 -> 1
    assert t.splits["test"][0].min().item() == pytest.approx(0.0)
    assert t.splits["test"][0].max().item() == pytest.approx(1.0)


def test_train_and_val_never_overlap_and_val_is_fixed(fake):
    root, _ = fake
    a = task(root, samples_per_class=20, image_size=28, seed=1)  # the whole pool
    b = task(root, samples_per_class=5, image_size=28, seed=2)
    val = {i for _, i in decode(a.splits["val"][0], "fashion_mnist", root)}
    assert len(val) == 10 * fm.VAL_PER_CLASS
    for t in (a, b):
        train = {i for _, i in decode(t.splits["train"][0], "fashion_mnist", root)}
        assert not train & val
        assert torch.equal(t.splits["val"][0], a.splits["val"][0])
        assert torch.equal(t.splits["test"][0], a.splits["test"][0])
    assert len({i for _, i in decode(a.splits["train"][0], "fashion_mnist", root)}) == 200
    # the index-level helper on the real class sizes
    labels = np.repeat(np.arange(10), 6000)
    train, val = fm.target_indices(labels, tuple(range(10)), make_config({"samples_per_class": 50, "seed": 9}), name="x")
    assert len(val) == 1000 and len(train) == 500 and not set(train) & set(val)


def test_training_subset_depends_on_seed_only(fake):
    root, _ = fake
    a = task(root, samples_per_class=5, seed=1)
    again = task(root, samples_per_class=5, seed=1)
    b = task(root, samples_per_class=5, seed=2)
    assert torch.equal(a.splits["train"][0], again.splits["train"][0])
    assert torch.equal(a.splits["train"][1], again.splits["train"][1])
    assert not torch.equal(a.splits["train"][0], b.splits["train"][0])


@pytest.mark.parametrize("size", [16, 40])
def test_image_size_is_respected(fake, size):
    root, _ = fake
    for dataset in ("fashion_mnist", "fashion_mnist5"):
        t = task(root, dataset, samples_per_class=2, image_size=size)
        for x, _ in t.splits.values():
            assert x.shape[1:] == (1, size, size)
        assert t.shift == max(1, size // 16)
    assert fm.fashion_mnist5_source(make_config({"image_size": size, "data_root": str(root)})).splits["train"][0].shape[1:] == (1, size, size)


def test_fashion_mnist5_target_is_classes_5_to_9_relabelled(fake):
    root, arrays = fake
    t = task(root, "fashion_mnist5", samples_per_class=4, image_size=28)
    assert t.num_classes == 5
    assert t.split_sizes() == {"train": 20, "val": 5 * fm.VAL_PER_CLASS, "test": 5 * TEST_PER_CLASS}
    for split, (x, y) in t.splits.items():
        assert set(y.tolist()) == set(range(5))
        source = arrays["test_labels" if split == "test" else "train_labels"]
        original = [int(source[i]) for _, i in decode(x, "fashion_mnist5", root)]
        assert original == [v + 5 for v in y.tolist()]
    # normalised by the training statistics
    data = fm.load(str(root))
    assert data.mean == pytest.approx(arrays["train_images"].mean() / 255)
    assert data.std == pytest.approx(arrays["train_images"].std() / 255)


def test_fashion_mnist5_source_is_classes_0_to_4(fake):
    root, arrays = fake
    src = fm.fashion_mnist5_source(make_config({"image_size": 28, "data_root": str(root)}))
    assert src.num_classes == 5 and src.split_sizes() == {"train": 540, "val": 60}
    ids = {}
    for split, (x, y) in src.splits.items():
        idx = [i for _, i in decode(x, "fashion_mnist5", root)]
        assert [int(arrays["train_labels"][i]) for i in idx] == y.tolist()
        ids[split] = set(idx)
    assert not ids["train"] & ids["val"]
    assert fm.FASHION_MNIST5.source is fm.fashion_mnist5_source and fm.FASHION_MNIST.source is None


def test_samples_per_class_larger_than_the_pool(fake):
    root, _ = fake
    with pytest.raises(SmileError, match=r"samples_per_class=21 needs 21 training images of fashion_mnist class .*pool holds 20"):
        task(root, samples_per_class=21)


def test_decoded_files_are_cached_per_root(fake):
    root, _ = fake
    first = fm.load(str(root))
    assert fm.load(str(root)) is first
    assert fm.load(str(root) + "/") is first  # the same folder, spelt differently
    assert not first.train_images.flags.writeable


def one_line_error(root: Path, name: str, *fragments: str) -> str:
    fm._load.cache_clear()
    with pytest.raises(SmileError) as err:
        task(root)
    message = str(err.value)
    assert "\n" not in message and name in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / fm.TEST_LABELS).unlink()
    message = one_line_error(tmp_path, fm.TEST_LABELS, "apt-get install dataset-fashion-mnist",
                             "zalandoresearch/fashion-mnist", str(tmp_path))
    assert fm.TRAIN_IMAGES in message  # it lists the files expected
    with pytest.raises(SmileError, match=fm.TEST_LABELS) as err:
        fm.read_idx(tmp_path / fm.TEST_LABELS, 2049)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    one_line_error(tmp_path / "nowhere", "nowhere", "apt-get install")


def test_truncated_gzip(tmp_path):
    write_dataset(tmp_path)
    path = tmp_path / fm.TRAIN_IMAGES
    path.write_bytes(path.read_bytes()[:5000])
    one_line_error(tmp_path, fm.TRAIN_IMAGES, "truncated")


def test_not_gzip(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / fm.TRAIN_LABELS).write_bytes(b"this is not gzip data\n" * 10)
    one_line_error(tmp_path, fm.TRAIN_LABELS, "not a readable gzip file")
    path = tmp_path / fm.TRAIN_LABELS
    data = gzip.compress(struct.pack(">ii", 2049, 3) + bytes(3))
    path.write_bytes(data[:-8] + b"\0\0\0\0" + data[-4:])  # bad CRC
    one_line_error(tmp_path, fm.TRAIN_LABELS, "not a readable gzip file")


def test_wrong_magic(tmp_path):
    arrays = write_dataset(tmp_path)
    write_idx(tmp_path / fm.TEST_LABELS, 2051, arrays["test_labels"])  # images' magic on labels
    one_line_error(tmp_path, fm.TEST_LABELS, "magic number 2051", "expected 2049")


def test_count_mismatch(tmp_path):
    arrays = write_dataset(tmp_path)
    write_idx(tmp_path / fm.TRAIN_IMAGES, 2051, arrays["train_images"][:-1], count=len(arrays["train_images"]))
    one_line_error(tmp_path, fm.TRAIN_IMAGES, "data bytes", "1200 x 28 x 28")
    # more data than the header says
    write_idx(tmp_path / fm.TRAIN_IMAGES, 2051, arrays["train_images"], count=len(arrays["train_images"]) - 1)
    one_line_error(tmp_path, fm.TRAIN_IMAGES, "940800 data bytes", "1199 x 28 x 28")
    # a corrupt header asking for an absurd size
    with gzip.open(tmp_path / fm.TRAIN_IMAGES, "wb") as f:
        f.write(struct.pack(">4i", 2051, 2**31 - 1, 2**31 - 1, 28))
    one_line_error(tmp_path, fm.TRAIN_IMAGES, "corrupt header")
    # the header is right but images and labels disagree
    write_idx(tmp_path / fm.TRAIN_IMAGES, 2051, arrays["train_images"][:-1])
    one_line_error(tmp_path, fm.TRAIN_IMAGES, "1199 images", fm.TRAIN_LABELS)


def test_read_idx_shapes(fake):
    root, arrays = fake
    x = fm.read_idx(root / fm.TRAIN_IMAGES, 2051)
    y = fm.read_idx(root / fm.TRAIN_LABELS, 2049)
    assert x.dtype == np.uint8 and x.shape == (1200, 28, 28) and np.array_equal(x, arrays["train_images"])
    assert y.shape == (1200,) and np.array_equal(y, arrays["train_labels"])


def test_real_files():
    if not all((REAL_ROOT / name).is_file() for name in fm.FILES):
        message = f"Fashion-MNIST is not installed in {REAL_ROOT} (apt-get install dataset-fashion-mnist)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    data = fm.load()
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    assert np.bincount(data.train_labels).tolist() == [6000] * 10
    assert np.bincount(data.test_labels).tolist() == [1000] * 10
    assert data.mean == pytest.approx(0.2860, abs=1e-3) and data.std == pytest.approx(0.3530, abs=1e-3)
    t = build_task(make_config({"dataset": "fashion_mnist", "image_size": 32, "samples_per_class": 5}))
    assert t.split_sizes() == {"train": 50, "val": 1000, "test": 10000}
    assert t.splits["test"][0].shape == (10000, 1, 32, 32)
    assert torch.bincount(t.splits["test"][1]).tolist() == [1000] * 10


def test_imagenet_weights_get_imagenet_statistics(fake):
    """One home for input normalisation: the weights. ImageNet weights on Fashion-MNIST
    see ImageNet-normalised RGB images, not the raw intensities they never saw."""
    root, _ = fake
    raw = task(root, samples_per_class=2, image_size=28, seed=3)
    for weights in ("imagenet", "IMAGENET1K_V1"):
        t = task(root, samples_per_class=2, image_size=28, seed=3, backbone="resnet18", weights=weights)
        assert t.in_channels == 3
        for split, (x, y) in t.splits.items():
            grey = raw.splits[split][0]
            mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            torch.testing.assert_close(x, (grey.expand(-1, 3, -1, -1) - mean) / std)
            assert torch.equal(y, raw.splits[split][1])
    # weights trained here (none) and a backbone that normalises inside keep [0, 1]
    for values in ({"backbone": "resnet18", "weights": "none"}, {"backbone": "efficientnet_lite0", "weights": "imagenet"}):
        t = task(root, samples_per_class=2, image_size=28, seed=3, **values)
        assert torch.equal(t.splits["test"][0], raw.splits["test"][0])
