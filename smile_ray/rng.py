"""Counter-based randomness: every random draw is keyed by (seed, stream, counter).

A training step's batch, augmentation, lambda and permutation depend only on the seed and
the step number, never on how many draws came before. So a run resumed from a checkpoint
at step k draws exactly what an uninterrupted run draws at step k, with no generator
state to save, and data-parallel ranks can share a draw (lambda) or take their own
(the permutation) by adding the rank to the key.
"""
from __future__ import annotations

import numpy as np
import torch

# stream ids
SPLIT, SUBSET, ORDER, AUGMENT, LAMBDA, PERMUTATION, INIT, CLASSES = range(1, 9)
INTERPOLATION = 9  # the image pairs of the interpolation loss (metrics.interpolation_losses)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def numpy_rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(keys)))


def torch_rng(*keys: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*keys))
    return g
