"""Target (and source) tasks by name: one file per dataset (``digits.py``, ...), each
defining a :class:`DatasetSpec` that :data:`smile_ray.registry.DATASETS` names.

Two kinds of task share one interface (``train_batch``, ``train_indices``,
``eval_batches``, ``split_sizes``, ``train_labels``, ``digest_tensors``, ``classes``,
``skipped_images``, ``num_classes``, ``in_channels``): :class:`TensorTask` holds small
datasets (digits, Fashion-MNIST) in memory as tensors; :class:`~smile_ray.data.images.ImageTask`
decodes and augments image files in DataLoader workers (CUB, Cars, Aircraft, ...).

A task hands the training loop deterministic batches: ``train_batch(step, batch_size)`` is
a pure function of the seed and the step (see :mod:`smile_ray.rng`), so resuming and
data-parallel sharding need no sampler state. Data-parallel ranks take contiguous
shards of the same global batch, so the union over ranks is the single-process batch.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import Tensor

from smile_ray import rng
from smile_ray.config import Config
from smile_ray.registry import DATASETS

if TYPE_CHECKING:
    from smile_ray.data.images import ImageTask


class StepOrder:
    """The order training images are visited in: consecutive epochs, each a permutation
    keyed by (seed, epoch), so the indices of a step's batch need no sampler state.

    Thread-safe: the prefetch thread (:class:`~smile_ray.recipe.Prefetcher`) builds step
    k + 1's batch while the methods that look up batch indices (RegSL, LwF) ask for step
    k's, and both read and refill the cache of permutations. A lock makes the
    check-clear-fill of that cache one step; without it, correctness would rest on
    which bytecodes CPython's GIL happens to run together (nothing, in a free-threaded
    build)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._orders: dict[int, Tensor] = {}
        self._orders_lock = threading.Lock()

    def __len__(self) -> int:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_orders_lock"}  # a lock does not pickle

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._orders_lock = threading.Lock()

    def _order(self, epoch: int) -> Tensor:
        with self._orders_lock:
            order = self._orders.get(epoch)
            if order is None:
                if len(self._orders) > 8:
                    self._orders.clear()
                g = rng.torch_rng(self.seed, rng.ORDER, epoch)
                order = self._orders[epoch] = torch.randperm(len(self), generator=g)
            return order

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


class TensorTask(StepOrder):
    """A classification task held in memory as tensors, with step-keyed batches.

    ``classes`` names the classes in label order (``metrics.json`` records them);
    ``skipped_images`` is always empty here (the image datasets fill theirs).
    """

    def __init__(
        self,
        splits: dict[str, tuple[Tensor, Tensor]],
        num_classes: int,
        seed: int,
        shift: int = 0,
        classes: list[str] | None = None,
    ):
        super().__init__(seed)
        self.splits = splits
        self.num_classes = num_classes
        self.in_channels = splits["train"][0].shape[1]
        self.shift = shift
        self.classes = list(classes) if classes is not None else None
        self.skipped_images: list[str] = []

    def __len__(self) -> int:
        return len(self.splits["train"][1])

    def train_batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """Rank ``rank``'s shard of the augmented global batch at ``step``: the draws
        (indices, shifts) are the global batch's, keyed by (seed, step), but only the
        shard's images are gathered and shifted."""
        x_all, y_all = self.splits["train"]
        per = batch_size // world_size
        shard = slice(rank * per, (rank + 1) * per)
        idx = self.train_indices(step, batch_size)[shard]
        x, y = x_all[idx], y_all[idx]
        if self.shift:
            oy, ox = shift_offsets(batch_size, self.shift, rng.torch_rng(self.seed, rng.AUGMENT, step))
            x = apply_shift(x, self.shift, oy[shard], ox[shard])
        return x, y

    def eval_batches(self, split: str, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.splits[split]
        for i in range(0, len(y), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]

    def images_at(self, split: str, indices: Sequence[int]) -> Tensor:
        """The un-augmented images of ``split`` at ``indices``, in that order."""
        return self.splits[split][0][torch.as_tensor(list(indices), dtype=torch.long)]

    def split_sizes(self) -> dict[str, int]:
        return {k: len(v[1]) for k, v in self.splits.items()}

    def train_labels(self) -> Tensor:
        """The training labels, in training-set index order."""
        return self.splits["train"][1]

    def digest_tensors(self) -> tuple[Tensor, ...]:
        """What identifies the training data for cached preparations (images and labels)."""
        return self.splits["train"]


def shift_offsets(b: int, pad: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Row and column offsets, each in ``[0, 2 * pad]``, of ``b`` images (rows drawn first)."""
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    return oy, ox


def apply_shift(x: Tensor, pad: int, oy: Tensor, ox: Tensor) -> Tensor:
    """Image ``i`` is the ``H x W`` window at ``(oy[i], ox[i])`` of itself zero-padded by
    ``pad`` on every side. Written as one zero tensor and one slice copy per image (no
    padded copy, no index tensors): bit-identical to the first version's 4-D
    advanced-indexing gather from the padded batch, and several times faster at 224 px
    (``python benchmarks/batch_building.py``)."""
    _, _, h, w = x.shape
    out = torch.zeros_like(x)
    for i, (top, left) in enumerate(zip(oy.tolist(), ox.tolist())):
        dy, dx = top - pad, left - pad  # output pixel (r, c) is input pixel (r + dy, c + dx)
        out[i, :, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
            x[i, :, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out


def random_shift(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``pad`` pixels (zero padding = the normalised mean)."""
    oy, ox = shift_offsets(len(x), pad, generator)
    return apply_shift(x, pad, oy, ox)


def weights_norm(config: Config) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """For the in-memory datasets: the (mean, std) the run's weights were trained with, or
    None where the dataset's own normalisation applies.

    Input normalisation has one home, the backbone's weights
    (:func:`smile_ray.models.input_norm`): pre-trained weights from elsewhere (a weight
    tag or a file) get their own statistics, e.g. ImageNet's for
    ``fashion_mnist + resnet18 + weights=imagenet``. ``weights=source`` (pre-trained here
    on the dataset's own normalisation) and ``weights=none`` keep the dataset's, as does
    a backbone that declares none (``digits_cnn``; EfficientNet-Lite normalises inside)."""
    if config.weights in ("source", "none"):
        return None
    from smile_ray.models import input_norm

    return input_norm(config.backbone, config.weights)


def normalise_rgb(x: Tensor, norm: tuple[Sequence[float], Sequence[float]]) -> Tensor:
    """``(N, 1 or 3, H, W)`` images in [0, 1] -> ``(N, C, H, W)`` ``(x - mean) / std`` per
    channel, ``C`` the statistics' channels: a grey image is repeated to them first, as
    the model would repeat it (``_adapt_channels``), so it is normalised as the weights
    expect an RGB grey image to be. Three times the memory of the grey tensor."""
    mean = torch.tensor(norm[0], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(norm[1], dtype=x.dtype).view(1, -1, 1, 1)
    if x.shape[1] == 1 and mean.shape[1] > 1:
        x = x.expand(-1, mean.shape[1], -1, -1)
    return ((x - mean) / std).contiguous()


@dataclass(frozen=True)
class DatasetSpec:
    """``target(config)`` builds the target task; ``source(config)`` the task a source
    model is pre-trained on for ``weights=source`` (None if the dataset has none; it may
    read only ``image_size`` and ``data_root``, the keys of the source-model cache).
    ``cached``: both also take ``cache_dir=`` (the source-model cache directory, or None
    for the default), where they may keep files derived from the dataset."""

    target: Callable[..., "TensorTask | ImageTask"]
    source: Callable[..., TensorTask] | None = None
    cached: bool = False

    def build_target(self, config: Config, cache_dir=None) -> "TensorTask | ImageTask":
        return self.target(config, cache_dir=cache_dir) if self.cached else self.target(config)

    def build_source(self, config: Config, cache_dir=None) -> TensorTask:
        return self.source(config, cache_dir=cache_dir) if self.cached else self.source(config)


def build_task(config: Config, cache_dir=None) -> "TensorTask | ImageTask":
    """The target task of ``config``; ``cache_dir`` as for the source models."""
    return DATASETS.get(config.dataset).build_target(config, cache_dir)
