"""The file-image pipeline: a dataset's :class:`~smile_ray.data.catalog.Catalog` becomes
an :class:`ImageTask`, the same interface as :class:`~smile_ray.data.TensorTask`, so the
training recipe and the methods never ask which kind of dataset they run on.

Building the task (:func:`image_task`), in order:

1. the kept classes (``class_fraction``, :mod:`smile_ray.data.subsets`);
2. every official training and test image of those classes is opened and decoded at a
   reduced scale (JPEG's DCT scaling: the whole compressed stream is read, so a
   truncated or corrupt file is caught now, not mid-training). An unreadable image stops
   the run with one line naming it, or, with ``skip_bad_images: true``, is left out with
   a warning and listed in ``metrics.json`` (``skipped_images``). Results are cached per
   process by (path, size, modification time);
3. validation is held out per class from the training images (``val_fraction``, fixed
   whatever the seed), then the training subset is drawn from the rest.

Batches. ``train_batch(step, batch_size, rank, world_size)`` hands rank ``rank`` its
contiguous shard of the global batch of ``step``. The global batch's indices
(:meth:`train_indices`, epochs of permutations keyed by (seed, epoch)) and its
augmentation (crop offsets and flips of every position in the global batch, drawn from
a generator keyed by (seed, step)) are computed in the training process; worker
processes only decode and transform. So a batch is a pure function of (seed, step,
rank, world_size), identical whatever the number of workers, the union of the shards is
the single-process batch, and a resumed run draws what an uninterrupted one draws.

Augmentation (the SMILE reference's, scaled to ``image_size`` S): train: resize to
``R x R`` with ``R = round(S * 256 / 224)``, random ``S x S`` crop, horizontal flip
with probability 1/2; evaluation: resize to ``R x R``, centre crop. Resizing is PIL's
bilinear (antialiased, what torchvision's ``Resize`` does on PIL images); JPEGs larger
than twice ``R`` are first decoded at a reduced DCT scale that keeps both sides >= R
(PIL's ``draft``), which changes pixels slightly and makes small ``image_size`` cheap.
Then ``x / 255`` and the backbone's input normalisation
(:attr:`smile_ray.models.BackboneSpec.input_norm`: ImageNet mean/std for ResNets;
nothing for EfficientNet-Lite, which normalises inside the model). With
``uint8_batches`` on (the recipe turns it on when training on CUDA) the workers hand
over the uint8 pixels instead, a quarter of the bytes to collate, pin and copy, and
:meth:`ImageTask.normalize` does the same arithmetic on the device after the copy
(bit-identical to the workers' on the CPU; tested).

Workers: ``data_workers`` DataLoader processes (-1: ``min(4, CPUs of this process)``;
0: decode in the training process), memory pinned when training on CUDA (the recipe's
copies are non-blocking); each data-parallel rank decodes only its own shard. The next
steps' batches are prefetched while the current one trains.
"""
from __future__ import annotations

import os
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from smile_ray import rng
from smile_ray.config import Config
from smile_ray.data import StepOrder
from smile_ray.data.catalog import Catalog, ImageSource
from smile_ray.data.subsets import draw, holdout, kept_classes, round_half_up, subset_counts
from smile_ray.errors import SmileError
from smile_ray.registry import BACKBONES

EVAL_BATCH = 128
_CHECK_SIDE = 32  # images are checked by a decode at (at least) this size
_checked: dict[Any, str | None] = {}  # stamp -> None (readable) or why not


def resize_side(image_size: int) -> int:
    """The side images are resized to before cropping ``image_size`` (256 for 224)."""
    return round_half_up(image_size * 256 / 224)


def auto_workers(config: Config) -> int:
    if config.data_workers >= 0:
        return config.data_workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(4, cpus)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


def decode(source: ImageSource, i: int, side: int):
    """Image ``i`` as a decoded RGB PIL image with both sides >= ``side`` where the
    format can decode at a reduced scale (JPEG), else at full size."""
    with source.open(i) as im:  # closes the file, also on failure
        if im.format == "JPEG":
            im.draft("RGB", (side, side))
        return im.convert("RGB")  # decodes (a copy when already RGB)


def _check(source: ImageSource, i: int) -> str | None:
    stamp = source.stamp(i)
    if stamp is None:
        return None
    if stamp in _checked:
        return _checked[stamp]
    try:
        decode(source, i, _CHECK_SIDE)
        why = None
    except FileNotFoundError:
        why = "no such file"
    except Exception as e:  # PIL raises many types for unreadable images
        why = _one_line(e)
    _checked[stamp] = why
    return why


def find_bad_images(source: ImageSource, indices: Sequence[int]) -> list[tuple[int, str]]:
    """(index, reason) of the images of ``indices`` that cannot be decoded."""
    indices = [int(i) for i in indices]
    if not indices or source.stamp(indices[0]) is None:
        return []
    threads = min(8, max(1, (os.cpu_count() or 1)))  # PIL releases the GIL while decoding
    with ThreadPoolExecutor(threads) as pool:
        reasons = list(pool.map(lambda i: _check(source, i), indices))
    return [(i, why) for i, why in zip(indices, reasons) if why is not None]


def to_uint8(im) -> Tensor:
    """A PIL RGB image as a ``3 x H x W`` uint8 tensor."""
    return torch.from_numpy(np.array(im, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def normalize(x: Tensor, mean: Tensor | None, std: Tensor | None) -> Tensor:
    """uint8 pixels (one image or a batch, on any device) to the float input: ``x / 255``
    then the backbone's normalisation."""
    x = x.float().div_(255.0)
    if mean is not None:
        x = x.sub_(mean.to(x.device)).div_(std.to(x.device))
    return x


def to_tensor(im, mean: Tensor | None, std: Tensor | None) -> Tensor:
    return normalize(to_uint8(im), mean, std)


def transform(im, image_size: int, top: int, left: int, flip: bool):
    """Resize to R x R, crop ``image_size`` at (top, left) (centre when top < 0), flip."""
    from PIL import Image

    side = resize_side(image_size)
    if im.size != (side, side):
        im = im.resize((side, side), Image.BILINEAR)
    if top < 0:  # torchvision's CenterCrop offsets
        top = left = int(round((side - image_size) / 2.0))
    im = im.crop((left, top, left + image_size, top + image_size))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return im


@dataclass(frozen=True)
class _Bad:
    """What a worker returns instead of a batch when an image fails to decode."""

    message: str


class _Decoded(torch.utils.data.Dataset):
    """Items ``(i, top, left, flip)`` -> ``(normalised image, label)`` (``raw``: the uint8
    image): the part that runs in the DataLoader's worker processes (everything random was
    drawn before)."""

    def __init__(self, source: ImageSource, labels: Tensor, image_size: int, mean: Tensor | None,
                 std: Tensor | None, dataset: str, raw: bool = False):
        self.source, self.labels, self.image_size = source, labels, image_size
        self.mean, self.std, self.dataset, self.raw = mean, std, dataset, raw

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int, int, bool]):
        i, top, left, flip = item
        try:
            im = transform(decode(self.source, i, resize_side(self.image_size)), self.image_size, top, left, flip)
        except Exception as e:  # the file changed since it was checked
            return _Bad(f"{self.dataset}: cannot read image {self.source.name(i)} ({_one_line(e)})")
        return (to_uint8(im) if self.raw else to_tensor(im, self.mean, self.std)), int(self.labels[i])


def _collate(samples: list) -> Any:
    bad = next((s for s in samples if isinstance(s, _Bad)), None)
    if bad is not None:
        return bad
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.long)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # a worker decodes one image at a time; no intra-op threads


class _Steps:
    """The batch sampler of training: the items of this rank's shard, step after step."""

    def __init__(self, task: "ImageTask", start: int, batch_size: int, rank: int, world_size: int):
        # A weak reference: the task holds the DataLoader iterator that holds this sampler,
        # and a cycle would leave the workers to the garbage collector (whose shutdown of
        # them waits out a 5 s timeout) instead of stopping them when the task is freed.
        self.task = weakref.ref(task)
        self.start, self.batch_size, self.rank, self.world_size = start, batch_size, rank, world_size

    def __iter__(self) -> Iterator[list[tuple[int, int, int, bool]]]:
        step = self.start
        while (task := self.task()) is not None:
            items = task.shard_items(step, self.batch_size, self.rank, self.world_size)
            del task  # not held across the yield
            yield items
            step += 1


class ImageTask(StepOrder):
    """A classification task over images decoded on the fly; the interface of
    :class:`~smile_ray.data.TensorTask` (``train_batch``, ``train_indices``,
    ``eval_batches``, ``split_sizes``, ``train_labels``, ``digest_tensors``)."""

    in_channels = 3

    def __init__(self, splits: dict[str, tuple[ImageSource, Tensor]], classes: list[str], seed: int,
                 image_size: int, norm: tuple[Sequence[float], Sequence[float]] | None, workers: int = 0,
                 pin_memory: bool = False, dataset: str = "images", skipped_images: list[str] | None = None):
        super().__init__(seed)
        self.sources = splits
        self.classes = list(classes)
        self.num_classes = len(classes)
        self.image_size = image_size
        self.norm = norm
        self.mean = torch.tensor(norm[0]).view(3, 1, 1) if norm else None
        self.std = torch.tensor(norm[1]).view(3, 1, 1) if norm else None
        self.workers = workers
        self.pin_memory = pin_memory
        self.dataset = dataset
        self.skipped_images = list(skipped_images or [])
        self._train_iter: Iterator | None = None
        self._train_key: tuple[int, int, int] | None = None
        self._next_step = -1
        self._uint8 = False
        self._norm_on: dict[torch.device, tuple[Tensor, Tensor]] = {}  # mean, std per device

    @property
    def uint8_batches(self) -> bool:
        """Whether batches come as uint8 pixels, for :meth:`normalize` after the copy to
        the device (off by default: batches are the float input)."""
        return self._uint8

    @uint8_batches.setter
    def uint8_batches(self, on: bool) -> None:
        if bool(on) != self._uint8:
            self._uint8 = bool(on)
            self.close()  # the running workers produce the other kind

    def normalize(self, x: Tensor) -> Tensor:
        """A uint8 batch (on any device) to the float input the workers would have made.
        The mean and std are copied to the device once, not at every step (a copy from
        pageable memory would synchronise the stream)."""
        if self.mean is None:
            return normalize(x, None, None)
        if x.device not in self._norm_on:
            self._norm_on[x.device] = (self.mean.to(x.device), self.std.to(x.device))
        return normalize(x, *self._norm_on[x.device])

    def __len__(self) -> int:
        return len(self.sources["train"][1])

    # ---- what is random, drawn in this process

    def augmentation(self, step: int, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """Crop offsets (top, left) and flips of every position of the global batch at
        ``step``: keyed by (seed, step) alone."""
        g = rng.torch_rng(self.seed, rng.AUGMENT, step)
        room = resize_side(self.image_size) - self.image_size + 1
        top = torch.randint(0, room, (batch_size,), generator=g)
        left = torch.randint(0, room, (batch_size,), generator=g)
        flip = torch.rand(batch_size, generator=g) < 0.5
        return top, left, flip

    def shard_items(self, step: int, batch_size: int, rank: int = 0,
                    world_size: int = 1) -> list[tuple[int, int, int, bool]]:
        idx = self.train_indices(step, batch_size)
        top, left, flip = self.augmentation(step, batch_size)
        per = batch_size // world_size
        lo, hi = rank * per, (rank + 1) * per
        return [(int(i), int(t), int(l), bool(f))
                for i, t, l, f in zip(idx[lo:hi], top[lo:hi], left[lo:hi], flip[lo:hi])]

    # ---- the DataLoader

    def _loader(self, split: str, batch_sampler) -> torch.utils.data.DataLoader:
        source, labels = self.sources[split]
        return torch.utils.data.DataLoader(
            _Decoded(source, labels, self.image_size, self.mean, self.std, self.dataset, raw=self._uint8),
            batch_sampler=batch_sampler, num_workers=self.workers, collate_fn=_collate,
            pin_memory=self.pin_memory, worker_init_fn=_worker_init if self.workers else None,
            generator=torch.Generator(),  # not the global generator: a run's torch RNG state is its own
        )

    @staticmethod
    def _checked(batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, _Bad):
            raise SmileError(batch.message)
        return batch

    def train_batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """Rank ``rank``'s shard of the augmented global batch at ``step``. Consecutive
        steps come from one DataLoader that prefetches; any other step restarts it there."""
        key = (batch_size, rank, world_size)
        if self._train_iter is None or self._train_key != key or self._next_step != step:
            self._train_iter = None  # shuts the previous workers down
            self._train_iter = iter(self._loader("train", _Steps(self, step, batch_size, rank, world_size)))
            self._train_key = key
        batch = next(self._train_iter)
        self._next_step = step + 1
        return self._checked(batch)

    def _unaugmented(self, split: str, ids: Sequence[int],
                     batch_size: int = EVAL_BATCH) -> Iterator[tuple[Tensor, Tensor]]:
        """Resized, centre-cropped images of ``split`` at ``ids``, in that order, batch by batch."""
        batches = [[(i, -1, -1, False) for i in ids[lo:lo + batch_size]] for lo in range(0, len(ids), batch_size)]
        for batch in self._loader(split, batches):
            yield self._checked(batch)

    def eval_batches(self, split: str, batch_size: int = EVAL_BATCH) -> Iterator[tuple[Tensor, Tensor]]:
        """Un-augmented (resized, centre-cropped) images of ``split`` in order."""
        yield from self._unaugmented(split, range(len(self.sources[split][1])), batch_size)

    def images_at(self, split: str, indices: Sequence[int]) -> Tensor:
        """The un-augmented images of ``split`` at ``indices`` (in that order, repeats
        allowed), as :meth:`eval_batches` gives them, decoding only those files, each
        once."""
        wanted = sorted({int(i) for i in indices})
        decoded = torch.cat([x for x, _ in self._unaugmented(split, wanted)])
        row = {i: k for k, i in enumerate(wanted)}
        return decoded[[row[int(i)] for i in indices]]

    def close(self) -> None:
        """Stop the training DataLoader's workers (they also stop when the task is freed)."""
        self._train_iter = None

    # ---- what the recipe and the methods read

    def split_sizes(self) -> dict[str, int]:
        return {k: len(v[1]) for k, v in self.sources.items()}

    def train_labels(self) -> Tensor:
        return self.sources["train"][1]

    def digest_tensors(self) -> tuple[Tensor, ...]:
        """What identifies the training images for cached preparations: their labels and
        the identity of the files (paths, sizes, times) under this size and normalisation."""
        source, labels = self.sources["train"]
        meta = repr((self.image_size, self.norm)).encode() + source.fingerprint()
        return labels, torch.frombuffer(bytearray(meta), dtype=torch.uint8)


def input_norm(config: Config) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The backbone's declared input normalisation (None: it takes images in [0, 1])."""
    return BACKBONES.get(config.backbone).input_norm


def image_task(config: Config, catalog: Catalog) -> ImageTask:
    """The training task of ``catalog`` under ``config`` (see the module docstring)."""
    name = catalog.dataset
    kept = kept_classes(len(catalog.classes), config)
    train_idx = np.flatnonzero(np.isin(catalog.train_labels, kept))
    test_idx = np.flatnonzero(np.isin(catalog.test_labels, kept))

    skipped: list[str] = []
    bad_train = find_bad_images(catalog.train, train_idx)
    bad_test = find_bad_images(catalog.test, test_idx)
    bad = [(catalog.train, i, why) for i, why in bad_train] + [(catalog.test, i, why) for i, why in bad_test]
    if bad:
        source, i, why = bad[0]
        if not config.skip_bad_images:
            more = f" ({len(bad)} unreadable among the {len(train_idx) + len(test_idx)} images checked)" if len(bad) > 1 else ""
            raise SmileError(f"{name}: cannot read image {source.name(i)} ({why}){more}; "
                             "set skip_bad_images=true to leave unreadable images out")
        skipped = [s.name(j) for s, j, _ in bad]
        warnings.warn(f"{name}: left out {len(bad)} unreadable images (skip_bad_images=true), "
                      f"e.g. {skipped[0]} ({why})", stacklevel=2)
        train_idx = np.setdiff1d(train_idx, [i for i, _ in bad_train])
        test_idx = np.setdiff1d(test_idx, [i for i, _ in bad_test])

    labels = np.full(len(catalog.train_labels), -1, dtype=np.int64)
    labels[train_idx] = catalog.train_labels[train_idx]
    val, pools = holdout(labels, kept, config.val_fraction)
    names = [catalog.classes[c] for c in kept]
    counts = subset_counts([len(p) for p in pools], names, config, name)
    train = np.concatenate(draw(pools, counts, config.seed))
    val = np.concatenate(val)
    if not len(val):
        raise SmileError(f"{name}: no validation images (every kept class has fewer than 2 training images "
                         f"under {catalog.root})")
    if not len(test_idx):
        raise SmileError(f"{name}: no test images of the kept classes under {catalog.root}")

    lut = np.full(len(catalog.classes), -1, dtype=np.int64)
    lut[kept] = np.arange(len(kept))

    def part(source: ImageSource, all_labels: np.ndarray, idx: np.ndarray) -> tuple[ImageSource, Tensor]:
        return source.take(idx), torch.from_numpy(lut[all_labels[idx]])

    splits = {
        "train": part(catalog.train, catalog.train_labels, train),
        "val": part(catalog.train, catalog.train_labels, val),
        "test": part(catalog.test, catalog.test_labels, test_idx),
    }
    pin = config.device != "cpu" and torch.cuda.is_available()
    return ImageTask(splits, names, config.seed, config.image_size, input_norm(config), workers=auto_workers(config),
                     pin_memory=pin, dataset=name, skipped_images=skipped)
