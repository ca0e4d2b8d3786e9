"""In-memory tasks: :class:`TensorTask` (the :class:`~smile_ray.data.task.Task` of digits
and Fashion-MNIST, and of any dataset small enough to hold as tensors), the random-shift
augmentation they train with, and their input normalisation."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from smile_ray import rng
from smile_ray.config import Config
from smile_ray.data.task import StepOrder


class TensorTask(StepOrder):
    """A classification task held in memory as tensors, with step-keyed batches
    (:class:`~smile_ray.data.task.Task`).

    ``classes`` names the classes in label order (``metrics.json`` records them);
    ``skipped_images`` is always empty here (the image datasets fill theirs).
    """

    builds_ahead = False  # a CUDA run's Prefetcher builds the next batch on a thread

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

    def train_on(self, device: torch.device) -> None:
        """Nothing to do: the batches are float tensors in host memory (the recipe's
        Prefetcher pins them for a CUDA run)."""

    def normalize(self, x: Tensor) -> Tensor:
        return x  # the batches are already the float input

    def close(self) -> None:
        """Nothing to stop: batches are built in the calling thread."""


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
