"""``fashion_mnist`` and ``fashion_mnist5``: Zalando's Fashion-MNIST (60,000 training and
10,000 test images, 28 x 28 grey, 10 classes of 6,000 + 1,000), read from its four IDX
``.gz`` files in ``data_root`` (default ``/usr/share/datasets/fashion-mnist``, where
Debian's ``dataset-fashion-mnist`` package puts them).

Classes: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt,
7 Sneaker, 8 Bag, 9 Ankle boot.

* ``fashion_mnist`` (for ImageNet backbones, ``weights=imagenet``; no source task): all 10
  classes. From the training images a validation split of 100 images per class (1,000)
  is held out once by a fixed seed; ``samples_per_class`` training images per class are
  drawn by ``seed`` from the remaining 5,900 per class, so training and validation never
  overlap. The test split is the 10,000 test images.
* ``fashion_mnist5`` (weight-free, mirroring ``digits``): the source task is classes 0-4
  (their 30,000 training images, 10 % per class held out by a fixed seed as its
  validation split, 27,000 to train on); the target task is classes 5-9 relabelled 0-4,
  with the same split rules (100 validation images per class, training draws from the
  rest) and the 5,000 test images of classes 5-9.
* The paper's subset keys apply to both targets (:mod:`smile_ray.data.subsets`):
  ``class_fraction`` keeps a seeded choice of the classes (validation and test too),
  ``train_images`` / ``sample_rate`` replace ``samples_per_class``; the validation
  hold-out stays 100 per class (``val_fraction`` is for the image datasets).

Images: uint8 -> float in [0, 1] -> resized bilinearly to ``image_size`` (antialiased
when downsizing), one channel (the model repeats it for 3-channel backbones). Then

* the target tasks, with pre-trained weights from elsewhere (a weight tag such as
  ``imagenet``, or a file) whose backbone declares a normalisation: the weights' own
  (:func:`smile_ray.data.weights_norm`; ImageNet's mean/std for torchvision's and timm's
  families), the grey channel repeated to three first (three times the memory);
  the shift then pads with 0, the weights' mean colour, not black;
* otherwise ``fashion_mnist``: left in [0, 1]: ``efficientnet_lite0`` normalises its
  input itself (TensorFlow's ``(255 x - 127) / 128``);
* otherwise ``fashion_mnist5``: ``(x - mean) / std`` with the mean and standard deviation of the
  60,000 training images (about 0.286 and 0.353), for source and target alike, so a
  source model sees target images normalised as it was trained.

Training batches get a random translation of up to ``max(1, image_size // 16)`` pixels
and nothing else: no flips or crops, as for ``digits`` (most items are roughly
left-right symmetric, so flips would add little; they are left out deliberately). The
shift pads with 0: black, the background, for ``fashion_mnist``; the mean intensity for
``fashion_mnist5``.

Memory: the decoded uint8 arrays (about 55 MB) are cached once per process and per
``data_root``; only the images a task uses are converted to float and resized (the
drawn training subset, the validation split, the test split), never the whole training
set. At ``image_size`` 64 the 10,000 float32 test images take 164 MB (41 MB at 32 px);
the ``fashion_mnist5`` source task holds 27,000 images (110 MB at 32 px, 442 MB at 64 px).
The cache is not invalidated if the files change while the process runs.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from smile_ray.config import Config
from smile_ray.data.task import DatasetSpec
from smile_ray.data.tensor_task import TensorTask, normalise_rgb, weights_norm
from smile_ray.data.subsets import draw, fixed_split, kept_classes, subset_counts
from smile_ray.errors import SmileError, one_line

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x00000803: uint8, 3 dims; 0x00000801: uint8, 1 dim
NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET5_CLASSES = (5, 6, 7, 8, 9)
VAL_PER_CLASS = 100
SOURCE_VAL_FRACTION = 0.1
_CHUNK = 4096  # images converted and resized at a time (bounds the temporaries)
_MAX_BYTES = 1 << 32  # a larger IDX header is corrupt (Fashion-MNIST's largest file holds 47 MB)

GET_IT = (
    "install them with `apt-get install dataset-fashion-mnist` (which puts them in "
    f"{DEFAULT_ROOT}), or download the four IDX .gz files from Zalando's "
    "https://github.com/zalandoresearch/fashion-mnist repository (data/fashion) into data_root"
)


def _missing_message(root: Path, missing: list[str]) -> str:
    return (
        f"Fashion-MNIST: missing {', '.join(str(root / m) for m in missing)}; "
        f"data_root={str(root)!r} must hold {', '.join(FILES)}: {GET_IT}"
    )


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """The uint8 array of a gzip-compressed IDX file whose magic number must be ``magic``
    (2051 for images: shape (count, rows, cols); 2049 for labels: shape (count,)).

    The array is read-only. Every failure raises a one-line :class:`SmileError` naming
    the file.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            return _read_idx(f, path, magic)
    except FileNotFoundError:
        if path.name in FILES:
            raise SmileError(_missing_message(path.parent, [path.name])) from None
        raise SmileError(f"{path}: no such file") from None
    except EOFError:
        raise SmileError(f"{path}: truncated gzip file (it ends before its end-of-stream marker)") from None
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile, CRC errors, directories, permissions
        raise SmileError(f"{path}: not a readable gzip file ({one_line(e)})") from None


def _read_exactly(f: gzip.GzipFile, view: memoryview) -> int:
    """Fill ``view`` from ``f`` in chunks (no second copy of a 47 MB file); bytes read."""
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos:pos + (1 << 22)])
        if not n:
            break
        pos += n
    return pos


def _read_idx(f: gzip.GzipFile, path: Path, magic: int) -> np.ndarray:
    head = f.read(4)
    if len(head) < 4:
        raise SmileError(f"{path}: {len(head)} bytes after decompression, too short for an IDX header")
    (got,) = struct.unpack(">i", head)
    if got != magic:
        raise SmileError(
            f"{path}: IDX magic number {got} (0x{got & 0xFFFFFFFF:08x}), expected {magic} (0x{magic:08x})"
        )
    ndim = magic & 0xFF
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise SmileError(f"{path}: {4 + len(dims)} bytes after decompression, shorter than its {4 + 4 * ndim}-byte IDX header")
    shape = struct.unpack(f">{ndim}i", dims)
    if any(d < 0 for d in shape):
        raise SmileError(f"{path}: negative size in the IDX header {shape}")
    expected = math.prod(shape)
    if expected > _MAX_BYTES:
        raise SmileError(f"{path}: the IDX header ({' x '.join(map(str, shape))}) says {expected} data bytes, "
                         f"more than the {_MAX_BYTES} this reader accepts (a corrupt header?)")
    out = np.empty(expected, dtype=np.uint8)
    got_bytes = _read_exactly(f, memoryview(out))
    if got_bytes == expected:  # read on to the end: anything left is an error, and gzip checks its CRC there
        extra = f.read(1 << 20)
        while extra:
            got_bytes += len(extra)
            extra = f.read(1 << 20)
    if got_bytes != expected:
        raise SmileError(
            f"{path}: {got_bytes} data bytes, but the IDX header ({' x '.join(map(str, shape))}) says {expected}"
        )
    out = out.reshape(shape)
    out.flags.writeable = False  # cached and shared: callers index copies out of it
    return out


@dataclass(frozen=True)
class FashionArrays:
    """The decoded files (read-only uint8 arrays) and the pixel statistics in [0, 1] of
    the training images."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: float
    std: float


def _root(data_root: str) -> str:
    return os.path.abspath(data_root or DEFAULT_ROOT)


def load(data_root: str = "") -> FashionArrays:
    """The four files of ``data_root`` ('' = the default folder), decoded once per process."""
    return _load(_root(data_root))


@functools.lru_cache(maxsize=2)
def _load(root: str) -> FashionArrays:
    base = Path(root)
    missing = [name for name in FILES if not (base / name).is_file()]
    if missing:
        raise SmileError(_missing_message(base, missing))
    arrays = {}
    for split, images, labels in (("train", TRAIN_IMAGES, TRAIN_LABELS), ("test", TEST_IMAGES, TEST_LABELS)):
        x, y = read_idx(base / images, IMAGES_MAGIC), read_idx(base / labels, LABELS_MAGIC)
        if len(x) != len(y):
            raise SmileError(f"{base / images}: {len(x)} images, but {base / labels} has {len(y)} labels")
        if len(y) and int(y.max()) >= NUM_CLASSES:
            raise SmileError(f"{base / labels}: label {int(y.max())} outside 0-{NUM_CLASSES - 1}")
        arrays[split] = (x, y)
    # Mean and std from a histogram, chunk by chunk: no float (or intp) copy of the 47 M
    # training pixels.
    train = arrays["train"][0]
    hist = np.zeros(256, dtype=np.float64)
    for i in range(0, len(train), _CHUNK):
        hist += np.bincount(train[i:i + _CHUNK].reshape(-1), minlength=256)
    values = np.arange(256) / 255.0
    total = max(hist.sum(), 1.0)
    mean = float((hist * values).sum() / total)
    std = float(np.sqrt(max((hist * values**2).sum() / total - mean**2, 0.0))) or 1.0
    return FashionArrays(*arrays["train"], *arrays["test"], mean=mean, std=std)


def _images(u8: np.ndarray, size: int, normalise: Callable[[Tensor], Tensor]) -> Tensor:
    """(N, H, W) uint8 -> (N, 1, size, size) float32, normalised and resized chunk by chunk.
    The normalisation is affine and bilinear weights sum to 1, so it is applied before
    resizing, on the smaller 28 px images."""
    n, h, w = u8.shape
    out = torch.empty((n, 1, size, size))
    for i in range(0, n, _CHUNK):
        x = normalise(torch.from_numpy(np.ascontiguousarray(u8[i:i + _CHUNK])).unsqueeze(1).float().div_(255.0))
        if (h, w) != (size, size):
            x = F.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < max(h, w)
            )
        out[i:i + _CHUNK] = x
    return out


def _labels(labels: np.ndarray, classes: tuple[int, ...]) -> Tensor:
    lut = np.full(NUM_CLASSES, -1, dtype=np.int64)
    lut[list(classes)] = np.arange(len(classes))
    return torch.from_numpy(lut[labels])


def target_indices(labels: np.ndarray, classes: tuple[int, ...], config: Config,
                   name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices into the training images: ``VAL_PER_CLASS`` per class held
    out once (:func:`~smile_ray.data.subsets.fixed_split`), the training images drawn by
    ``seed`` from the rest as the subset keys say (:mod:`smile_ray.data.subsets`)."""
    val, pools = fixed_split(labels, classes, lambda n: [VAL_PER_CLASS])
    counts = subset_counts([len(p) for p in pools], [CLASS_NAMES[c] for c in classes], config, name,
                           held_out=f"{VAL_PER_CLASS} per class")
    return np.concatenate(draw(pools, counts, config.seed)), np.concatenate(val)


def _target(config: Config, classes: tuple[int, ...], name: str,
            normalise: Callable[[FashionArrays], Callable[[Tensor], Tensor]]) -> TensorTask:
    data = load(config.data_root)
    norm = normalise(data)
    weights = weights_norm(config)
    if weights is not None:  # the weights' statistics, not the dataset's (one home)
        norm = _raw(data)
    classes = tuple(classes[i] for i in kept_classes(len(classes), config))
    train, val = target_indices(data.train_labels, classes, config, name)
    test = np.flatnonzero(np.isin(data.test_labels, classes))
    size = config.image_size
    splits = {
        "train": (_images(data.train_images[train], size, norm), _labels(data.train_labels[train], classes)),
        "val": (_images(data.train_images[val], size, norm), _labels(data.train_labels[val], classes)),
        "test": (_images(data.test_images[test], size, norm), _labels(data.test_labels[test], classes)),
    }
    if weights is not None:
        splits = {k: (normalise_rgb(x, weights), y) for k, (x, y) in splits.items()}
    return TensorTask(splits, len(classes), config.seed, shift=max(1, size // 16),
                      classes=[CLASS_NAMES[c] for c in classes])


def _raw(data: FashionArrays) -> Callable[[Tensor], Tensor]:
    return lambda x: x  # intensities in [0, 1]: the ImageNet backbone normalises its input itself


def _stats(data: FashionArrays) -> Callable[[Tensor], Tensor]:
    return lambda x: x.sub_(data.mean).div_(data.std)


def fashion_mnist_target(config: Config, cache_dir: str | Path | None = None) -> TensorTask:
    return _target(config, tuple(range(NUM_CLASSES)), "fashion_mnist", _raw)


def fashion_mnist5_target(config: Config, cache_dir: str | Path | None = None) -> TensorTask:
    return _target(config, TARGET5_CLASSES, "fashion_mnist5", _stats)


def fashion_mnist5_source(config: Config, cache_dir: str | Path | None = None) -> TensorTask:
    """Classes 0-4: 90 % of their training images to train on, 10 % per class (fixed)
    held out for validation."""
    image_size = config.image_size
    data = load(config.data_root)
    norm = _stats(data)
    classes = SOURCE_CLASSES
    val, train = (np.concatenate(p) for p in
                  fixed_split(data.train_labels, classes, lambda n: [int(round(SOURCE_VAL_FRACTION * n))]))
    splits = {
        name: (_images(data.train_images[idx], image_size, norm), _labels(data.train_labels[idx], classes))
        for name, idx in (("train", train), ("val", val))
    }
    return TensorTask(splits, len(classes), seed=0, shift=max(1, image_size // 16))


FASHION_MNIST = DatasetSpec(target=fashion_mnist_target, source=None)
FASHION_MNIST5 = DatasetSpec(target=fashion_mnist5_target, source=fashion_mnist5_source)
