"""Which classes and which images a task uses: the fixed validation hold-out and the
paper's subsets (docs/method.md, "Subsets and splits").

The paper names its settings "C:X/N:Y": Y training images from X of the classes.

* ``class_fraction`` (C:25% = 0.25): ``round(fraction * C)`` classes (at least one),
  chosen by ``seed`` (stream :data:`smile_ray.rng.CLASSES`); 1 keeps every class and
  draws nothing. The validation and test splits keep only those classes; labels are
  renumbered 0..k-1 in the dataset's own class order.
* the training images of each kept class come from its *pool*, what is left after the
  validation hold-out, by exactly one rule:

  - ``train_images`` (N:400): that many in total, ``N // k`` per class and one more for
    ``N % k`` classes chosen by ``seed``;
  - ``sample_rate`` (N:15% = 0.15, N:100% = 1): ``round(rate * pool)`` per class (at
    least one);
  - otherwise ``samples_per_class`` per class.

  The images are drawn without replacement by one generator keyed by (``seed``,
  :data:`smile_ray.rng.SUBSET`), class by class in label order (what the digits and
  Fashion-MNIST tasks have always drawn for ``samples_per_class``).

The validation hold-out (:func:`holdout`) depends on the dataset alone, never on the
seed or the subset keys, so every run of a dataset is selected on the same images and
no training subset ever contains one of them. Rounding is half up.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from smile_ray import rng
from smile_ray.config import Config
from smile_ray.errors import SmileError

#: the seed of every dataset's fixed split (validation and test hold-outs, source/target
#: pools): every run of a dataset is scored on the same images, whatever its seed
SPLIT_SEED = 0


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def kept_classes(num_classes: int, config: Config) -> np.ndarray:
    """The (sorted) class ids kept under ``class_fraction``, chosen by ``seed``."""
    if config.class_fraction >= 1:
        return np.arange(num_classes)
    k = min(num_classes, max(1, round_half_up(config.class_fraction * num_classes)))
    chosen = rng.numpy_rng(config.seed, rng.CLASSES).choice(num_classes, k, replace=False)
    return np.sort(chosen)


def fixed_split(labels: np.ndarray, classes: Sequence[int], cuts: Callable[[int], Sequence[int]], *,
                shared_stream: bool = False, sort: bool = True) -> list[list[np.ndarray]]:
    """The one fixed (seed-independent) split of a dataset's images: ``parts[j][i]`` are
    the indices into ``labels`` of part ``j`` of class ``classes[i]``.

    Class c's indices are permuted and cut at ``cuts(n)`` (the sizes of every part but
    the last, which takes the rest; ``n`` the class's image count). The permutation is
    drawn by a generator keyed by (:data:`SPLIT_SEED`, SPLIT, c), so a class's parts do
    not depend on the other classes; with ``shared_stream`` one generator keyed by
    (SPLIT_SEED, SPLIT) permutes the classes one after another instead (how digits has
    always been split). ``sort`` puts each part in index order; without it a part keeps
    the permutation's order (digits' training pool: the draw from it follows that order).
    """
    shared = rng.numpy_rng(SPLIT_SEED, rng.SPLIT) if shared_stream else None
    parts: list[list[np.ndarray]] = [[] for _ in range(len(cuts(0)) + 1)]
    for c in classes:
        g = shared if shared is not None else rng.numpy_rng(SPLIT_SEED, rng.SPLIT, int(c))
        perm = g.permutation(np.flatnonzero(labels == c))
        for part, chunk in zip(parts, np.split(perm, np.cumsum(cuts(len(perm))))):
            part.append(np.sort(chunk) if sort else chunk)
    return parts


def holdout(labels: np.ndarray, classes: Sequence[int], fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per kept class, (held-out validation indices, pool indices) into ``labels``
    (:func:`fixed_split`): the first ``round(fraction * n)`` of the class's permutation
    are held out, at least one, and never the class's last image (a class with one
    training image has no validation image)."""
    val, pool = fixed_split(labels, classes,
                            lambda n: [0 if n < 2 else max(1, min(round_half_up(fraction * n), n - 1))])
    return val, pool


def subset_counts(pool_sizes: Sequence[int], class_names: Sequence[str], config: Config, dataset: str,
                  held_out: str | None = None) -> list[int]:
    """How many training images each kept class contributes (one-line errors naming the
    key; ``held_out`` says what validation took from the pools)."""
    held_out = held_out or f"val_fraction={config.val_fraction}"
    k = len(pool_sizes)
    if config.train_images:
        n = config.train_images
        if n < k:
            raise SmileError(f"train_images={n} is fewer than the {k} classes kept by class_fraction="
                             f"{config.class_fraction} (one image per class at least)")
        counts = [n // k] * k
        for i in rng.numpy_rng(config.seed, rng.CLASSES, 1).choice(k, n % k, replace=False):
            counts[int(i)] += 1
        key = f"train_images={n}"
    elif config.sample_rate:
        counts = [max(1, round_half_up(config.sample_rate * s)) for s in pool_sizes]
        key = f"sample_rate={config.sample_rate}"
    else:
        counts = [config.samples_per_class] * k
        key = f"samples_per_class={config.samples_per_class}"
    for want, have, name in zip(counts, pool_sizes, class_names):
        if want > have:
            raise SmileError(
                f"{key} needs {want} training images of {dataset} class {name!r}, but its pool holds {have} "
                f"after holding out {held_out} for validation"
            )
    return counts


def draw(pools: Sequence[np.ndarray], counts: Sequence[int], seed: int) -> list[np.ndarray]:
    """``counts[i]`` indices from ``pools[i]`` without replacement, by (seed, SUBSET)."""
    g = rng.numpy_rng(seed, rng.SUBSET)
    return [g.choice(pool, count, replace=False) for pool, count in zip(pools, counts)]
