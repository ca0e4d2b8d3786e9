"""What a training task is (:class:`Task`) and how a dataset declares its tasks
(:class:`DatasetSpec`).

Two kinds of task implement :class:`Task`: :class:`~smile_ray.data.tensor_task.TensorTask`
holds small datasets (digits, Fashion-MNIST) in memory as tensors;
:class:`~smile_ray.data.images.ImageTask` decodes and augments image files in DataLoader
workers (CUB, Cars, Aircraft, ...). The recipe, the methods and the metrics read a task
only through this interface, never its ``splits`` and never its class.

A task hands the training loop deterministic batches: ``train_batch(step, batch_size)`` is
a pure function of the seed and the step (see :mod:`smile_ray.rng`), so resuming and
data-parallel sharding need no sampler state. Data-parallel ranks take contiguous
shards of the same global batch, so the union over ranks is the single-process batch.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor

from smile_ray import rng
from smile_ray.config import Config
from smile_ray.registry import DATASETS


class Task(Protocol):
    """A classification task with step-keyed training batches."""

    num_classes: int
    in_channels: int
    classes: list[str] | None  # the class names in label order (metrics.json records them)
    skipped_images: list[str]  # images left out as unreadable (skip_bad_images)
    #: whether the task builds its training batches ahead itself (DataLoader workers); if
    #: not, a CUDA run builds them one step ahead on a thread (:class:`smile_ray.recipe.Prefetcher`)
    builds_ahead: bool

    def train_indices(self, step: int, batch_size: int) -> Tensor:
        """Training-set indices of the global batch at ``step``."""

    def train_batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """Rank ``rank``'s shard of the augmented global batch at ``step``."""

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        """The un-augmented batches of ``split`` (train, val or test), in index order."""

    def images_at(self, split: str, indices: Sequence[int]) -> Tensor:
        """The un-augmented images of ``split`` at ``indices``, in that order."""

    def split_sizes(self) -> dict[str, int]: ...

    def train_labels(self) -> Tensor:
        """The training labels, in training-set index order."""

    def digest_tensors(self) -> tuple[Tensor, ...]:
        """What identifies the training data for cached preparations."""

    def train_on(self, device: torch.device) -> None:
        """The run trains on ``device`` (called once the methods' preparations, which read
        float batches, are done): a task may pin its batches for it, decode there, or hand
        uint8 pixels that :meth:`normalize` turns into the input after the copy."""

    def normalize(self, x: Tensor) -> Tensor:
        """A uint8 batch (on any device) to the float input (the recipe calls it for uint8
        batches only)."""

    def close(self) -> None:
        """Stop what the task runs in the background (DataLoader workers) now; a later
        batch starts it again. The recipe calls it when a run ends, failed or not."""


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


#: ``builder(config, cache_dir)``: ``cache_dir`` is the run's cache folder (None: the
#: default, :func:`smile_ray.paths.cache_root`), where a builder may keep files derived
#: from the dataset (digits keeps its corpus there); most builders ignore it
Builder = Callable[[Config, "str | Path | None"], Task]


@dataclass(frozen=True)
class DatasetSpec:
    """``target(config, cache_dir)`` builds the target task; ``source(config, cache_dir)``
    the task a source model is pre-trained on for ``weights=source`` (None if the dataset
    has none; it may read only ``image_size`` and ``data_root``, the keys of the
    source-model cache). Both take the cache folder (see :data:`Builder`)."""

    target: Builder
    source: Builder | None = None


def build_task(config: Config, cache_dir: str | Path | None = None) -> Task:
    """The target task of ``config``; ``cache_dir`` as for the source models."""
    return DATASETS.get(config.dataset).target(config, cache_dir)

