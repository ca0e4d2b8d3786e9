"""Target (and source) tasks by name.

A task hands the training loop deterministic batches: ``train_batch(step, batch_size)`` is
a pure function of the seed and the step (see :mod:`smile_ray.rng`), so resuming and
data-parallel sharding need no sampler state. Data-parallel ranks take contiguous
shards of the same global batch, so the union over ranks is the single-process batch.

The embedded default, ``digits``, is built from scikit-learn's bundled 8x8 handwritten
digits (1,797 images), so it runs anywhere without a download:

* source task: digits 0-4 (a source model is pre-trained on them once and cached);
* target task: digits 5-9 (relabelled 0-4), split once by a fixed seed into a held-out
  test split (40 % of each class), a validation split (20 %) and a training pool (40 %,
  at least 69 images per class), from which ``samples_per_class`` images per class are
  drawn by ``seed``.

Images are upsampled bilinearly to ``image_size`` and normalised; training batches get a
random translation of up to ``image_size // 16`` pixels (no flips: they change digits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from smile_ray import rng
from smile_ray.config import Config
from smile_ray.errors import SmileError
from smile_ray.registry import Registry

SPLIT_SEED = 0  # the test/val/pool split is fixed: every run is scored on the same images


class TensorTask:
    """A classification task held in memory as tensors, with step-keyed batches."""

    def __init__(
        self,
        splits: dict[str, tuple[Tensor, Tensor]],
        num_classes: int,
        seed: int,
        shift: int = 0,
    ):
        self.splits = splits
        self.num_classes = num_classes
        self.in_channels = splits["train"][0].shape[1]
        self.seed = seed
        self.shift = shift
        self._orders: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.splits["train"][1])

    def _order(self, epoch: int) -> Tensor:
        if epoch not in self._orders:
            if len(self._orders) > 8:
                self._orders.clear()
            g = rng.torch_rng(self.seed, rng.ORDER, epoch)
            self._orders[epoch] = torch.randperm(len(self), generator=g)
        return self._orders[epoch]

    def train_indices(self, step: int, batch_size: int) -> Tensor:
        """Indices of the global batch at ``step``: consecutive epochs of reshuffled data."""
        n = len(self)
        pos = torch.arange(step * batch_size, (step + 1) * batch_size)
        epochs = pos // n
        out = torch.empty(batch_size, dtype=torch.long)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._order(e)[pos[sel] % n]
        return out

    def train_batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """Rank ``rank``'s shard of the augmented global batch at ``step``."""
        x_all, y_all = self.splits["train"]
        idx = self.train_indices(step, batch_size)
        x, y = x_all[idx], y_all[idx]
        if self.shift:
            x = random_shift(x, self.shift, rng.torch_rng(self.seed, rng.AUGMENT, step))
        if world_size > 1:
            per = batch_size // world_size
            x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        return x, y

    def eval_batches(self, split: str, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.splits[split]
        for i in range(0, len(y), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]

    def split_sizes(self) -> dict[str, int]:
        return {k: len(v[1]) for k, v in self.splits.items()}


def random_shift(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``pad`` pixels (zero padding = the normalised mean)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(x.shape[1])[None, :, None, None]
    return padded[bi, ci, rows, cols]


@dataclass(frozen=True)
class DatasetSpec:
    """``target(config)`` builds the target task; ``source(image_size)`` the task a
    source model is pre-trained on for ``weights=source`` (None if the dataset has none)."""

    target: Callable[[Config], TensorTask]
    source: Callable[[int], TensorTask] | None = None


DATASETS: Registry[DatasetSpec] = Registry("dataset")


# ---------------------------------------------------------------- digits (embedded)

DIGITS_SOURCE_CLASSES = (0, 1, 2, 3, 4)
DIGITS_TARGET_CLASSES = (5, 6, 7, 8, 9)
DIGITS_TEST_FRACTION, DIGITS_VAL_FRACTION = 0.4, 0.2


def _digits_images(image_size: int) -> tuple[Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    # Normalise with the statistics of the whole corpus: the zero of the padding in
    # random_shift is then the mean intensity.
    x = (x - x.mean()) / x.std()
    return x.contiguous(), d.target


def _split_per_class(labels: np.ndarray, classes: tuple[int, ...], fractions: tuple[float, ...]) -> list[np.ndarray]:
    """Fixed per-class split of the indices of ``classes`` into len(fractions)+1 parts."""
    g = rng.numpy_rng(SPLIT_SEED, rng.SPLIT)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in classes:
        idx = g.permutation(np.flatnonzero(labels == c))
        cuts = np.cumsum([int(round(f * len(idx))) for f in fractions])
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.extend(chunk.tolist())
    return [np.asarray(p) for p in parts]


def _relabel(labels: np.ndarray, classes: tuple[int, ...]) -> Tensor:
    lut = {c: i for i, c in enumerate(classes)}
    return torch.tensor([lut[int(v)] for v in labels], dtype=torch.long)


def digits_target(config: Config) -> TensorTask:
    x, labels = _digits_images(config.image_size)
    classes = DIGITS_TARGET_CLASSES
    test, val, pool = _split_per_class(labels, classes, (DIGITS_TEST_FRACTION, DIGITS_VAL_FRACTION))
    smallest = min(int((labels[pool] == c).sum()) for c in classes)
    if config.samples_per_class > smallest:
        raise SmileError(
            f"samples_per_class={config.samples_per_class} is larger than the digits training "
            f"pool ({smallest} images in its smallest class)"
        )
    g = rng.numpy_rng(config.seed, rng.SUBSET)
    train = np.concatenate(
        [g.choice(pool[labels[pool] == c], config.samples_per_class, replace=False) for c in classes]
    )
    splits = {
        name: (x[idx], _relabel(labels[idx], classes))
        for name, idx in (("train", train), ("val", val), ("test", test))
    }
    return TensorTask(splits, len(classes), config.seed, shift=max(1, config.image_size // 16))


def digits_source(image_size: int) -> TensorTask:
    x, labels = _digits_images(image_size)
    classes = DIGITS_SOURCE_CLASSES
    val, train = _split_per_class(labels, classes, (0.1,))
    splits = {
        name: (x[idx], _relabel(labels[idx], classes)) for name, idx in (("train", train), ("val", val))
    }
    return TensorTask(splits, len(classes), seed=0, shift=max(1, image_size // 16))


DATASETS.register("digits")(DatasetSpec(target=digits_target, source=digits_source))


def build_task(config: Config) -> TensorTask:
    return DATASETS.get(config.dataset).target(config)
