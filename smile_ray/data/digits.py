"""``digits``: the embedded default task, built from scikit-learn's bundled 8x8
handwritten digits (1,797 images), so it runs anywhere without a download:

* source task: digits 0-4 (a source model is pre-trained on them once and cached);
* target task: digits 5-9 (relabelled 0-4), split once by a fixed seed into a held-out
  test split (40 % of each class), a validation split (20 %) and a training pool (40 %,
  at least 69 images per class), from which ``samples_per_class`` images per class are
  drawn by ``seed`` (or as ``train_images`` / ``sample_rate`` say; ``class_fraction``
  keeps a seeded choice of the five classes: :mod:`smile_ray.data.subsets`).

Images are upsampled bilinearly to ``image_size`` and normalised (with the corpus's
statistics, or, for pre-trained weights from elsewhere, the weights' own:
:func:`smile_ray.data.weights_norm`); training batches get a
random translation of up to ``image_size // 16`` pixels (no flips: they change digits).

The 1,797 raw images (integers 0-16) and labels are cached as ``digits-<sklearn
version>.npz`` (116 KB) in the cache directory beside the source models: importing
``sklearn.datasets`` costs about a second per process, reading the file a millisecond.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from smile_ray.checkpoint import atomic_write
from smile_ray.config import Config
from smile_ray.data.task import DatasetSpec
from smile_ray.data.tensor_task import TensorTask, normalise_rgb, weights_norm
from smile_ray.data.subsets import draw, fixed_split, kept_classes, subset_counts
from smile_ray.paths import cache_root

DIGITS_SOURCE_CLASSES = (0, 1, 2, 3, 4)
DIGITS_TARGET_CLASSES = (5, 6, 7, 8, 9)
DIGITS_TEST_FRACTION, DIGITS_VAL_FRACTION = 0.4, 0.2


def digits_cache_path(cache_dir: str | Path | None) -> Path:
    return cache_root(cache_dir) / f"digits-{metadata.version('scikit-learn')}.npz"


def digits_arrays(cache_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images (1797, 8, 8) uint8 in 0..16, labels)``, read from
    the cache file when it is there, else from scikit-learn (and then cached). A cache
    that cannot be read is rebuilt; one that cannot be written is skipped."""
    path = digits_cache_path(cache_dir)
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
        if images.shape == (1797, 8, 8) and labels.shape == (1797,):
            return images, labels
    except (OSError, ValueError, KeyError):
        pass
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = d.images.astype(np.uint8), d.target.astype(np.int64)  # the values are integers 0..16

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels)

    try:
        atomic_write(path, save)
    except OSError:
        pass  # a read-only cache directory: the next run reads scikit-learn again
    return images, labels


def _digits_images(image_size: int, cache_dir: str | Path | None = None,
                   norm: tuple | None = None) -> tuple[Tensor, np.ndarray]:
    images, labels = digits_arrays(cache_dir)
    x = torch.from_numpy(images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if norm is not None:  # pre-trained weights from elsewhere: their statistics (data.weights_norm)
        return normalise_rgb(x, norm), labels
    # Normalise with the statistics of the whole corpus: the zero of the padding in
    # random_shift is then the mean intensity.
    x = (x - x.mean()) / x.std()
    return x.contiguous(), labels


def _split(labels: np.ndarray, classes: tuple[int, ...], fractions: tuple[float, ...]) -> list[np.ndarray]:
    """Fixed per-class split of the indices of ``classes`` into len(fractions)+1 parts,
    each the classes' parts one after another, in permutation order
    (:func:`~smile_ray.data.subsets.fixed_split` with one stream for all classes)."""
    parts = fixed_split(labels, classes, lambda n: [int(round(f * n)) for f in fractions], shared_stream=True,
                        sort=False)
    return [np.concatenate(p) for p in parts]


def _relabel(labels: np.ndarray, classes: tuple[int, ...]) -> Tensor:
    lut = {c: i for i, c in enumerate(classes)}
    return torch.tensor([lut[int(v)] for v in labels], dtype=torch.long)


def digits_target(config: Config, cache_dir: str | Path | None = None) -> TensorTask:
    x, labels = _digits_images(config.image_size, cache_dir, weights_norm(config))
    # the splits are made over all five target classes, then cut to the kept ones, so a
    # class's test and validation images do not depend on class_fraction
    test, val, pool = _split(labels, DIGITS_TARGET_CLASSES, (DIGITS_TEST_FRACTION, DIGITS_VAL_FRACTION))
    classes = tuple(DIGITS_TARGET_CLASSES[i] for i in kept_classes(len(DIGITS_TARGET_CLASSES), config))
    test, val = test[np.isin(labels[test], classes)], val[np.isin(labels[val], classes)]
    pools = [pool[labels[pool] == c] for c in classes]
    counts = subset_counts([len(p) for p in pools], [str(c) for c in classes], config, "digits",
                           held_out=f"{DIGITS_TEST_FRACTION:.0%} for test and {DIGITS_VAL_FRACTION:.0%}")
    train = np.concatenate(draw(pools, counts, config.seed))
    splits = {
        name: (x[idx], _relabel(labels[idx], classes))
        for name, idx in (("train", train), ("val", val), ("test", test))
    }
    return TensorTask(splits, len(classes), config.seed, shift=max(1, config.image_size // 16),
                      classes=[str(c) for c in classes])


def digits_source(config: Config, cache_dir: str | Path | None = None) -> TensorTask:
    image_size = config.image_size
    x, labels = _digits_images(image_size, cache_dir)
    classes = DIGITS_SOURCE_CLASSES
    val, train = _split(labels, classes, (0.1,))
    splits = {
        name: (x[idx], _relabel(labels[idx], classes)) for name, idx in (("train", train), ("val", val))
    }
    return TensorTask(splits, len(classes), seed=0, shift=max(1, image_size // 16))


DIGITS = DatasetSpec(target=digits_target, source=digits_source)


