"""Metrics of a run, each name defined once.

``EVAL_METRICS`` are what the training recipe records at every evaluation (and what a
study may tune on); ``FINAL_METRICS`` are added once, at the end of a run. Tables,
MLflow and Tune read these names from here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: recorded at every evaluation, with the direction that is better
EVAL_METRICS = {"val_acc": "max", "val_ece": "min", "train_loss": "min"}
#: recorded once at the end of a run (test metrics are never used for selection)
FINAL_METRICS = ("val_acc", "val_ece", "test_acc", "test_ece", "test_nll", "seconds")
#: the numbers a run reports to whatever orchestrates it (metrics plus bookkeeping)
REPORTED = tuple(dict.fromkeys(("step", "lr", *EVAL_METRICS, *FINAL_METRICS)))


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 accuracy, expected calibration error (15 bins) and NLL."""
    return {
        "acc": (logits.argmax(1) == labels).float().mean().item(),
        "ece": expected_calibration_error(logits, labels),
        "nll": F.cross_entropy(logits, labels).item(),
    }


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` over equal-width confidence bins."""
    conf, pred = torch.softmax(logits, 1).max(1)
    correct = (pred == labels).float()
    which = torch.clamp((conf * bins).ceil().long() - 1, 0, bins - 1)
    # |B_b|/N * |acc_b - conf_b| = |sum of correct - sum of confidence in b| / N
    acc = torch.zeros(bins, device=logits.device).index_add_(0, which, correct)
    cnf = torch.zeros(bins, device=logits.device).index_add_(0, which, conf)
    return ((acc - cnf).abs().sum() / len(labels)).item()
