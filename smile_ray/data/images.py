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
(:func:`smile_ray.models.input_norm`: a weight tag's own mean/std, from the weights'
metadata, else the family's: ImageNet's for torchvision's and timm's families; nothing
for EfficientNet-Lite, which normalises inside the model). With
``uint8_batches`` on (the recipe turns it on when training on CUDA) the workers hand
over the uint8 pixels instead, a quarter of the bytes to collate, pin and copy, and
:meth:`ImageTask.normalize` does the same arithmetic on the device after the copy
(bit-identical to the workers' on the CPU; tested).

Workers: ``data_workers`` DataLoader processes (-1: ``min(4, CPUs this process may
use)``, :func:`worker_count`; 0: decode in the training process), memory pinned when the
run trains on CUDA (the recipe sets :attr:`ImageTask.device`; the recipe's copies are
non-blocking); each data-parallel rank decodes only its own shard. The next steps'
batches are prefetched while the current one trains. Evaluation has its own loader,
kept with its workers alive from one ``evaluate()`` to the next (``persistent_workers``):
forking ``data_workers`` fresh processes at every evaluation would cost more than a small
validation split's decoding.

Device decoding (``decode: device``). PIL decodes, resizes and crops about 470 images/s
per core, so four workers cannot feed a GPU that trains ResNet-50 at 4,500 images/s.
With ``decode: device`` the workers only read the files' bytes; the training process
decodes each batch on the run's device with ``torchvision.io.decode_jpeg`` (one batched
call: nvJPEG on CUDA), then resizes (bilinear, antialiased), crops and flips there with
the same crop offsets and flips, drawn by the same (seed, step) key, as the PIL path
(:func:`decode_batch`). Files that are not JPEG (PNG, ...) and in-memory images (CIFAR)
are decoded by PIL in the workers and resized on the device like the rest; a JPEG the
device decoder refuses is retried with PIL before it counts as unreadable. Pixels are
close to the PIL path's, not identical: torchvision's antialiased resize rounds
differently (at most 1 of 255 on the CPU, tested), nvJPEG's IDCT may differ from
libjpeg's by a level or two, and JPEGs of more than twice the resize side are decoded
at full scale instead of PIL's reduced DCT scale (``draft``), which changes pixels more.
Runs stay reproducible (a pure function of the seed and the step on one device), but
``decode: device`` and ``decode: cpu`` are two different pipelines. ``decode: auto`` is
the PIL path everywhere: no GPU measurement has shown device decoding faster yet
(``benchmarks/gpu.sh`` measures both). On the CPU the device path runs with
``device="cpu"`` (how the tests cover it); with no workers it measured faster than PIL
on a shared 2-core machine (``benchmarks/input_pipeline.py --workers 0 --decode device``:
293-359 against 127-165 images/s at 224 px), but it decodes in the training process,
on one core, where the PIL path spreads over the workers: not a reason to change auto.
"""
from __future__ import annotations

import io
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
from smile_ray.cpus import cpu_share, process_cpus
from smile_ray.config import Config
from smile_ray.data.task import StepOrder
from smile_ray.data.catalog import Catalog, Images
from smile_ray.data.subsets import draw, holdout, kept_classes, round_half_up, subset_counts
from smile_ray.errors import SmileError, one_line

EVAL_BATCH = 128
_CHECK_SIDE = 32  # images are checked by a decode at (at least) this size
_checked: dict[Any, str | None] = {}  # stamp -> None (readable) or why not


def resize_side(image_size: int) -> int:
    """The side images are resized to before cropping ``image_size`` (256 for 224)."""
    return round_half_up(image_size * 256 / 224)


def worker_count(requested: int, affinity: int, omp_num_threads: str | None) -> int:
    """DataLoader workers for ``data_workers=requested``: itself when >= 0; -1 gives
    ``min(4, CPUs)`` where CPUs is what this process may use: ``affinity`` (the cores its
    CPU affinity allows), capped by ``OMP_NUM_THREADS`` when that is a positive integer.
    Ray sets ``OMP_NUM_THREADS`` in a task or actor to its CPU reservation (``num_cpus``,
    floored, at least 1; 1 when none was given) while the affinity still spans the whole
    node, so without the cap every Ray Train worker of a 4-GPU node would start workers
    for the whole node's cores."""
    if requested >= 0:
        return requested
    return min(4, cpu_share(affinity, omp_num_threads))


def auto_workers(config: Config) -> int:
    """:func:`worker_count` for this process (:func:`smile_ray.cpus.process_cpus`)."""
    return worker_count(config.data_workers, process_cpus(), None)


def decode(images: Images, i: int, side: int):
    """Image ``i`` as a decoded RGB PIL image with both sides >= ``side`` where the
    format can decode at a reduced scale (JPEG), else at full size."""
    with images.open(i) as im:  # closes the file, also on failure
        if im.format == "JPEG":
            im.draft("RGB", (side, side))
        return im.convert("RGB")  # decodes (a copy when already RGB)


def _check(images: Images, i: int) -> str | None:
    stamp = images.stamp(i)
    if stamp is None:
        return None
    if stamp in _checked:
        return _checked[stamp]
    try:
        decode(images, i, _CHECK_SIDE)
        why = None
    except FileNotFoundError:
        why = "no such file"
    except Exception as e:  # PIL raises many types for unreadable images
        why = one_line(e)
    _checked[stamp] = why
    return why


def find_bad_images(images: Images, indices: Sequence[int]) -> list[tuple[int, str]]:
    """(index, reason) of the images of ``indices`` that cannot be decoded."""
    indices = [int(i) for i in indices]
    if not indices or images.stamp(indices[0]) is None:
        return []
    threads = min(8, max(1, (os.cpu_count() or 1)))  # PIL releases the GIL while decoding
    with ThreadPoolExecutor(threads) as pool:
        reasons = list(pool.map(lambda i: _check(images, i), indices))
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


_JPEG_MAGIC = b"\xff\xd8\xff"


def decode_batch(images: Sequence[Tensor], crops: Sequence[tuple[int, int, bool]], image_size: int,
                 device: torch.device | str, name=lambda k: f"image {k}") -> Tensor:
    """The device-decoding path (``decode: device``): a ``B x 3 x S x S`` uint8 batch on
    ``device`` from, per image, either its JPEG file's bytes (a 1-d uint8 tensor) or its
    already decoded ``3 x H x W`` pixels, and its crop ``(top, left, flip)`` (top < 0:
    the centre), as :func:`transform` does it: resize to ``R x R`` (bilinear, antialiased:
    torchvision's tensor resize, PIL's within 1 of 255 on the CPU), crop, flip.

    The JPEGs are decoded in one ``torchvision.io.decode_jpeg`` call (on CUDA one nvJPEG
    batch). If that call fails, each is decoded alone, and one the device decoder refuses
    is decoded by PIL (nvJPEG lacks some JPEG flavours PIL reads); one PIL cannot read
    either raises :class:`SmileError` naming it (``name(k)``)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    device = torch.device(device)
    pixels: list[Tensor | None] = [None if x.dim() == 1 else x.to(device, non_blocking=True) for x in images]
    jpegs = [k for k, x in enumerate(pixels) if x is None]
    if jpegs:
        try:
            decoded = decode_jpeg([images[k] for k in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [_decode_one(images[k], device, name(k)) for k in jpegs]
        for k, x in zip(jpegs, decoded):
            pixels[k] = x
    side = resize_side(image_size)
    out = []
    for x, (top, left, flip) in zip(pixels, crops):
        if x.shape[-2:] != (side, side):
            x = F.resize(x, [side, side], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        if top < 0:  # torchvision's CenterCrop offsets, as in transform()
            top = left = int(round((side - image_size) / 2.0))
        x = x[:, top:top + image_size, left:left + image_size]
        out.append(x.flip(-1) if flip else x)
    return torch.stack(out)


def _decode_one(data: Tensor, device: torch.device, name: str) -> Tensor:
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        why = e
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return to_uint8(im.convert("RGB")).to(device)
    except Exception:  # PIL raises many types for unreadable images
        # torchvision's message starts with the function and its C++ source line
        raise SmileError(f"cannot read image {name} ({why.__class__.__name__}: {str(why).strip().split(', ')[-1]})") from None


@dataclass(frozen=True)
class _Bad:
    """What a worker returns instead of a batch when an image fails to decode."""

    message: str


@dataclass
class _Encoded:
    """A batch as the workers hand it over for device decoding: per item, its file's bytes
    (JPEG) or its PIL-decoded pixels (anything else), its crop, its (split, index)."""

    images: list[Tensor]
    crops: list[tuple[int, int, bool]]
    items: list[tuple[str, int]]
    labels: Tensor


class _Decoded(torch.utils.data.Dataset):
    """Items ``(split, i, top, left, flip)`` -> ``(normalised image, label)`` (``out="uint8"``:
    the uint8 image; ``out="bytes"``: what :func:`decode_batch` takes): the part that runs
    in the DataLoader's worker processes (everything random was drawn before)."""

    def __init__(self, sources: dict[str, tuple[Images, Tensor]], image_size: int, mean: Tensor | None,
                 std: Tensor | None, dataset: str, out: str = "float"):
        self.sources, self.image_size = sources, image_size
        self.mean, self.std, self.dataset, self.out = mean, std, dataset, out

    def __len__(self) -> int:
        return len(self.sources["train"][0])

    def __getitem__(self, item: tuple[str, int, int, int, bool]):
        split, i, top, left, flip = item
        source, labels = self.sources[split]
        try:
            if self.out == "bytes":
                data = source.read_bytes(i)
                if data is not None and data[:3] == _JPEG_MAGIC:
                    image = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                else:  # PNG, ...; or decoded already (CIFAR): PIL's pixels at full size
                    image = to_uint8(decode(source, i, 0))
                return image, (top, left, flip), (split, i), int(labels[i])
            im = transform(decode(source, i, resize_side(self.image_size)), self.image_size, top, left, flip)
        except Exception as e:  # the file changed since it was checked
            return _Bad(f"{self.dataset}: cannot read image {source.name(i)} ({one_line(e)})")
        return (to_uint8(im) if self.out == "uint8" else to_tensor(im, self.mean, self.std)), int(labels[i])


def _collate(samples: list) -> Any:
    bad = next((s for s in samples if isinstance(s, _Bad)), None)
    if bad is not None:
        return bad
    labels = torch.tensor([s[-1] for s in samples], dtype=torch.long)
    if len(samples[0]) == 4:  # out="bytes"
        return _Encoded([s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples], labels)
    return torch.stack([s[0] for s in samples]), labels


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # a worker decodes one image at a time; no intra-op threads


def _stop_workers(batches: Iterator | None) -> None:
    """Stop the worker processes of a DataLoader iterator now (nothing to do for one
    without workers, or none).

    Torch stops them when the iterator is freed (its ``__del__`` calls
    ``_shutdown_workers``), which is at once while nothing else holds it. But a run's
    objects can outlive it in a reference cycle (a traceback kept by some library's
    first import holds the frames of the run's set-up, and so its task), and the garbage
    collector then runs that ``__del__`` after multiprocessing's finalizers have already
    stopped the thread that feeds the workers' index queues: the workers never receive
    their stop, and each shutdown waits out torch's 5 s join timeout
    (``MP_STATUS_CHECK_INTERVAL``) before it terminates them, in whatever code the
    collection happens to interrupt. Measured: a 4-step run on image files left 10 s of
    such a stall (its training and its evaluation loaders) to the next collection.
    ``_shutdown_workers`` is the method ``__del__`` calls; it is idempotent."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


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
            yield [("train", *item) for item in items]
            step += 1


class _Requests:
    """The batch sampler of the persistent evaluation loader: the batches of the request
    being served (the loader iterates it afresh at each ``iter``)."""

    def __init__(self):
        self.batches: list[list[tuple[str, int, int, int, bool]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageTask(StepOrder):
    """A classification task over images decoded on the fly; the interface of
    :class:`~smile_ray.data.task.Task` (``train_batch``, ``train_indices``,
    ``eval_batches``, ``split_sizes``, ``train_labels``, ``digest_tensors``, ``train_on``,
    ``close``)."""

    in_channels = 3
    builds_ahead = True  # DataLoader workers prefetch (and pin) the training batches

    def __init__(self, splits: dict[str, tuple[Images, Tensor]], classes: list[str], seed: int,
                 image_size: int, norm: tuple[Sequence[float], Sequence[float]] | None, workers: int = 0,
                 dataset: str = "images", skipped_images: list[str] | None = None, decode: str = "cpu"):
        super().__init__(seed)
        self.sources = splits
        self.classes = list(classes)
        self.num_classes = len(classes)
        self.image_size = image_size
        self.norm = norm
        self.mean = torch.tensor(norm[0]).view(3, 1, 1) if norm else None
        self.std = torch.tensor(norm[1]).view(3, 1, 1) if norm else None
        self.workers = workers
        if decode not in ("cpu", "device"):
            raise ValueError(f"decode={decode!r}: cpu or device")
        self.decode = decode
        self.dataset = dataset
        self.skipped_images = list(skipped_images or [])
        self._train_iter: Iterator | None = None
        self._train_key: tuple[int, int, int] | None = None
        self._next_step = -1
        self._uint8 = False
        self._device = torch.device("cpu")
        self._eval_loader: torch.utils.data.DataLoader | None = None
        self._eval_requests = _Requests()
        self._eval_generation = 0
        self._norm_on: dict[torch.device, tuple[Tensor, Tensor]] = {}  # mean, std per device

    @property
    def device(self) -> torch.device:
        """The device the run trains on (the recipe sets it; CPU until then): batches are
        pinned for it when it is CUDA (only then: pinning starts a CUDA context on the
        current GPU, which a CPU run on a GPU node must not), and ``decode: device``
        decodes on it."""
        return self._device

    @device.setter
    def device(self, device: torch.device | str) -> None:
        device = torch.device(device)
        if device != self._device:
            self._device = device
            self.close()  # the running loaders pin (or not) for the old device

    @property
    def pin_memory(self) -> bool:
        """Whether the DataLoaders pin their batches: for a CUDA run's non-blocking copies,
        when the workers hand over pixels (with ``decode: device`` they hand over bytes,
        which the decoder reads where they are)."""
        return self._device.type == "cuda" and self.decode == "cpu"

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

    def train_on(self, device: torch.device) -> None:
        """Pin for ``device`` and decode there (:attr:`device`); on CUDA hand uint8 pixels,
        normalised after the copy of a quarter of the bytes (:attr:`uint8_batches`)."""
        self.device = device
        self.uint8_batches = self.device.type == "cuda"

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

    def _loader(self, batch_sampler, persistent: bool = False) -> torch.utils.data.DataLoader:
        out = "bytes" if self.decode == "device" else "uint8" if self._uint8 else "float"
        return torch.utils.data.DataLoader(
            _Decoded(self.sources, self.image_size, self.mean, self.std, self.dataset, out=out),
            batch_sampler=batch_sampler, num_workers=self.workers, collate_fn=_collate,
            pin_memory=self.pin_memory, worker_init_fn=_worker_init if self.workers else None,
            persistent_workers=persistent and self.workers > 0,
            generator=torch.Generator(),  # not the global generator: a run's torch RNG state is its own
        )

    def _checked(self, batch: Any) -> tuple[Tensor, Tensor]:
        """A worker's batch as the step takes it; device decoding happens here."""
        if isinstance(batch, _Bad):
            raise SmileError(batch.message)
        if not isinstance(batch, _Encoded):
            return batch

        def name(k: int) -> str:
            split, i = batch.items[k]
            return f"{self.sources[split][0].name(i)}"

        try:
            x = decode_batch(batch.images, batch.crops, self.image_size, self._device, name)
        except SmileError as e:
            raise SmileError(f"{self.dataset}: {e}") from None
        return (x if self._uint8 else self.normalize(x)), batch.labels

    def train_batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """Rank ``rank``'s shard of the augmented global batch at ``step``. Consecutive
        steps come from one DataLoader that prefetches; any other step restarts it there."""
        key = (batch_size, rank, world_size)
        if self._train_iter is None or self._train_key != key or self._next_step != step:
            _stop_workers(self._train_iter)
            self._train_iter = iter(self._loader(_Steps(self, step, batch_size, rank, world_size)))
            self._train_key = key
        batch = next(self._train_iter)
        self._next_step = step + 1
        return self._checked(batch)

    def _unaugmented(self, split: str, ids: Sequence[int],
                     batch_size: int = EVAL_BATCH) -> Iterator[tuple[Tensor, Tensor]]:
        """Resized, centre-cropped images of ``split`` at ``ids``, in that order, batch by
        batch. With workers, every request goes through one evaluation loader whose workers
        persist; a new request ends the previous one (iterating that one further raises)."""
        batches = [[(split, i, -1, -1, False) for i in ids[lo:lo + batch_size]]
                   for lo in range(0, len(ids), batch_size)]
        if not self.workers:
            for batch in self._loader(batches):
                yield self._checked(batch)
            return
        if self._eval_loader is None:
            self._eval_loader = self._loader(self._eval_requests, persistent=True)
        self._eval_generation += 1
        mine = self._eval_generation
        self._eval_requests.batches = batches
        batches_of = iter(self._eval_loader)  # the same iterator each time, reset: the workers stay
        while True:
            if self._eval_generation != mine:
                raise RuntimeError("an evaluation request was iterated after a newer one started")
            try:
                batch = next(batches_of)
            except StopIteration:
                return
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
        """Stop the DataLoaders' workers, training's and evaluation's, now (the next batch
        starts new ones): the recipe closes its task when the run ends, rather than
        leaving them to the garbage collector (:func:`_stop_workers`)."""
        _stop_workers(self._train_iter)
        _stop_workers(getattr(self._eval_loader, "_iterator", None))  # a persistent loader's
        self._train_iter = None
        self._eval_loader = None
        self._eval_generation += 1

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
    """The normalisation the backbone's weights expect (None: it takes images in [0, 1]):
    a weight tag's own (its metadata), else the family's declaration
    (:func:`smile_ray.models.input_norm`)."""
    from smile_ray.models import input_norm as weights_input_norm

    return weights_input_norm(config.backbone, config.weights)


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

    def part(images: Images, all_labels: np.ndarray, idx: np.ndarray) -> tuple[Images, Tensor]:
        return images.take(idx), torch.from_numpy(lut[all_labels[idx]])

    splits = {
        "train": part(catalog.train, catalog.train_labels, train),
        "val": part(catalog.train, catalog.train_labels, val),
        "test": part(catalog.test, catalog.test_labels, test_idx),
    }
    # decode=auto is the PIL path until a GPU measurement shows device decoding faster
    # (benchmarks/gpu.sh); pinning waits for the recipe to say which device the run uses
    return ImageTask(splits, names, config.seed, config.image_size, input_norm(config), workers=auto_workers(config),
                     dataset=name, skipped_images=skipped, decode="device" if config.decode == "device" else "cpu")
