"""Metrics of a run, each name defined once.

``EVAL_METRICS`` are what the training recipe records at every evaluation (and what a
study may tune on); ``FINAL_METRICS`` are added once, at the end of a run. Tables,
MLflow and Tune read these names from here.

Besides accuracy, calibration and NLL, two of the paper's analyses are measured once at
the end of a run: the reliability data behind the ECE (:func:`reliability_bins`) and the
interpolation loss of its Eq. 1 (:func:`interpolation_loss`, :func:`interpolation_losses`;
``docs/method.md``).
"""
from __future__ import annotations

import re

import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smile_ray import rng

#: the interpolation-loss metrics (paper, Eq. 1 and Table 4), on training and test images
IL_METRICS = ("label_il_train", "label_il_test", "feature_il_train", "feature_il_test")
#: recorded at every evaluation, with the direction that is better
EVAL_METRICS = {"val_acc": "max", "val_ece": "min", "train_loss": "min"}
#: recorded once at the end of a run (test metrics are never used for selection)
FINAL_METRICS = ("val_acc", "val_ece", "test_acc", "test_ece", "test_nll", *IL_METRICS, "seconds")
#: the numbers a run reports to whatever orchestrates it (metrics plus bookkeeping)
REPORTED = tuple(dict.fromkeys(("step", "lr", *EVAL_METRICS, *FINAL_METRICS)))
#: a tuning study's columns per trial beside its searched keys (trials.parquet, best.json)
RESULT_KEYS = ("val_acc", "val_ece", "test_acc", "test_ece", "steps", "seconds")
#: a replicated tune trial's spread (``val_acc_std``) or one seed's value (``val_acc_r0``) of a metric
REPLICATE_KEY = re.compile(r"(.+)_(?:std|r\d+)")

#: equal-width confidence bins of the ECE and the reliability diagram
CALIBRATION_BINS = 15
#: the mixing weights of the interpolation loss (its pairs per split: the config's ``il_pairs``)
IL_LAMBDAS = (0.25, 0.5, 0.75)
#: the key of each split's pairs in the random stream (fixed, whichever splits are measured)
IL_SPLIT_KEYS = {"train": 0, "val": 1, "test": 2}


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 accuracy, expected calibration error (15 bins) and NLL."""
    return {
        "acc": (logits.argmax(1) == labels).float().mean().item(),
        "ece": expected_calibration_error(logits, labels),
        "nll": F.cross_entropy(logits, labels).item(),
    }


def _bin_sums(logits: Tensor, labels: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per equal-width confidence bin ``((b-1)/bins, b/bins]``: the number of images, the
    sum of correct predictions and the sum of confidences (the max softmax probability)."""
    conf, pred = torch.softmax(logits.float(), 1).max(1)
    correct = (pred == labels).float()
    which = torch.clamp((conf * bins).ceil().long() - 1, 0, bins - 1)
    zeros = torch.zeros(bins, device=logits.device)
    count = zeros.clone().index_add_(0, which, torch.ones_like(conf))
    return count, zeros.clone().index_add_(0, which, correct), zeros.clone().index_add_(0, which, conf)


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = CALIBRATION_BINS) -> float:
    """``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` over equal-width confidence bins."""
    _, acc, cnf = _bin_sums(logits, labels, bins)
    # |B_b|/N * |acc_b - conf_b| = |sum of correct - sum of confidence in b| / N
    return ((acc - cnf).abs().sum() / len(labels)).item()


def reliability_bins(logits: Tensor, labels: Tensor, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """The reliability diagram's data, in the bins of :func:`expected_calibration_error`:
    per bin the mean confidence, the accuracy (both None for an empty bin) and the number
    of images. ``ece = sum_b count_b / N * |accuracy_b - confidence_b|``."""
    count, acc, cnf = (t.cpu().double() for t in _bin_sums(logits, labels, bins))
    some = count > 0
    return {
        "bins": bins,
        "confidence": [float(c / n) if s else None for c, n, s in zip(cnf, count, some)],
        "accuracy": [float(a / n) if s else None for a, n, s in zip(acc, count, some)],
        "count": [int(n) for n in count],
    }


# ------------------------------------------------------------------ interpolation loss


def interpolation_loss(
    f: Callable[[Tensor], "Tensor | dict[str, Tensor]"], x1: Tensor, x2: Tensor, lambdas: Sequence[float]
) -> "Tensor | dict[str, Tensor]":
    """The interpolation loss of the SMILE paper (Li et al., 2022, Eq. 1):

    ``IL(f) = mean_{pairs, lam} || f(lam x1 + (1 - lam) x2) - (lam f(x1) + (1 - lam) f(x2)) ||_2^2``

    over the pairs ``(x1[i], x2[i])`` and the weights ``lambdas``: the squared Euclidean
    norm of each pair's output (flattened after the batch dimension), averaged over pairs
    and weights. It is 0 for any ``f`` that is affine in its input (``lam + (1 - lam) =
    1``), and measures how far ``f`` is from behaving linearly between samples. ``f`` may
    return one tensor or a dict of them (one IL per entry, from the same forwards).
    """
    def as_dict(out):
        return out if isinstance(out, dict) else {"": out}

    clean1, clean2 = as_dict(f(x1)), as_dict(f(x2))
    total = {k: torch.zeros((), dtype=torch.float64, device=v.device) for k, v in clean1.items()}
    for lam in lambdas:
        mixed = as_dict(f(lam * x1 + (1.0 - lam) * x2))
        for k in total:
            gap = mixed[k] - (lam * clean1[k] + (1.0 - lam) * clean2[k])
            total[k] += gap.double().flatten(1).pow(2).sum(1).mean()
    out = {k: v / len(lambdas) for k, v in total.items()}
    return out[""] if set(out) == {""} else out


def il_pairs(n: int, seed: int, split: str, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """``pairs`` index pairs ``(i, j)``, ``i != j``, drawn uniformly (with replacement
    across pairs) from a split of ``n`` images, keyed by (seed, split): a run always
    measures the same pairs, and two runs with the same seed and data the same ones."""
    g = rng.numpy_rng(seed, rng.INTERPOLATION, IL_SPLIT_KEYS[split])
    i = g.integers(0, n, pairs)
    return i, (i + g.integers(1, n, pairs)) % n


@torch.inference_mode()
def interpolation_losses(
    model: nn.Module,
    task: Any,
    seed: int,
    to_device: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    *,
    splits: Iterable[str] = ("train", "test"),
    pairs: int,
    lambdas: Sequence[float] = IL_LAMBDAS,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Label-IL and Feature-IL (:func:`interpolation_loss`) of a trained student on the
    un-augmented images of each split, as the paper's Table 4 measures them: Label-IL on
    the target classifier's logits, Feature-IL on the globally average-pooled last
    feature map (the classifier's input). ``pairs`` pairs per split (:func:`il_pairs`),
    each mixed at every weight in ``lambdas``; eval mode, fp32, no gradients.

    Returns ``{label_il_<split>, feature_il_<split>}`` per split with at least two
    images, and ``interpolation``: what was measured (pairs, lambdas, seconds); ``{}``
    for ``pairs=0`` (the config's ``il_pairs=0``: not measured).
    """
    if pairs == 0:
        return {}
    started = time.perf_counter()
    was_training = model.training
    model.eval()

    def f(x: Tensor) -> dict[str, Tensor]:
        out = model(x)
        return {"label": out.logits.float(), "feature": torch.flatten(F.adaptive_avg_pool2d(out.fmap.float(), 1), 1)}

    result: dict[str, Any] = {}
    sizes = task.split_sizes()
    try:
        for split in splits:
            n = sizes.get(split, 0)
            if n < 2:
                continue
            i, j = il_pairs(n, seed, split, pairs)
            # only the pairs' images are read, each once (an image-file task decodes those alone)
            both = task.images_at(split, np.concatenate([i, j]))
            x1, x2 = both[:pairs], both[pairs:]
            sums = {"label": 0.0, "feature": 0.0}
            for lo in range(0, pairs, batch_size):
                a, _ = to_device(x1[lo:lo + batch_size], torch.zeros(0))
                b, _ = to_device(x2[lo:lo + batch_size], torch.zeros(0))
                for k, v in interpolation_loss(f, a.float(), b.float(), lambdas).items():
                    sums[k] += v.item() * len(a)
            result[f"label_il_{split}"] = sums["label"] / pairs
            result[f"feature_il_{split}"] = sums["feature"] / pairs
    finally:
        model.train(was_training)
    result["interpolation"] = {"pairs": pairs, "lambdas": list(lambdas), "seconds": time.perf_counter() - started}
    return result
