"""SMILE's loss terms as pure functions on tensors (Li et al., 2022; ``docs/method.md``).

Notation: a batch ``x`` of B images with labels ``y``; ``lam`` the mixing weight and
``perm`` a permutation of the batch, so the mixed input is
``x_mix = lam * x + (1 - lam) * x[perm]``. Student outputs are computed on ``x_mix``,
teacher outputs on the clean ``x``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sample_lambda(alpha: float, rng: np.random.Generator) -> float:
    """``lam ~ Beta(alpha, alpha)`` folded to ``max(lam, 1 - lam)``.

    The fold keeps the original sample dominant (``lam >= 0.5``), as the reference
    implementation does.
    """
    lam = float(rng.beta(alpha, alpha))
    return max(lam, 1.0 - lam)


def mix(x: Tensor, perm: Tensor, lam: float) -> Tensor:
    """``lam * x + (1 - lam) * x[perm]`` (inputs, or feature maps)."""
    return lam * x + (1.0 - lam) * x[perm]


def mixup_cross_entropy(logits: Tensor, y: Tensor, perm: Tensor, lam: float) -> Tensor:
    """Label mixup (Zhang et al., 2018):

    ``L_cls = lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])``
    with CE averaged over the batch.
    """
    return lam * F.cross_entropy(logits, y) + (1.0 - lam) * F.cross_entropy(logits, y[perm])


def feature_mixup_loss(
    fmap: Tensor,
    teacher_fmap: Tensor,
    perm: Tensor,
    lam: float,
    sum_over_ranks: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Sample-to-feature mixup:

    ``L_feat = || lam * t_fmap + (1 - lam) * t_fmap[perm] - fmap ||_F / (H * W)``

    ``fmap`` is the student's last convolutional stage on the mixed batch, ``(B, C, H, W)``;
    ``teacher_fmap`` the teacher's on the clean batch. As in the reference implementation the
    norm is the Frobenius norm of the whole batch tensor, not squared, divided by the
    spatial size; the teacher side is a constant (no gradient flows into it).

    Data parallel: with ``sum_over_ranks`` (a differentiable all-reduce, e.g.
    :func:`all_reduce_sum`) each rank holds one shard of the global batch, and the norm is
    that of the whole global batch, ``sqrt(sum_ranks ||shard||^2)``. Every rank then holds
    the single-process value, and the gradient each rank gets for its shard is N times
    the single-process one, which DDP's gradient averaging over N ranks undoes.
    """
    target = mix(teacher_fmap.detach(), perm, lam)
    h, w = fmap.shape[-2:]
    squared = (target - fmap).float().pow(2).sum()
    if sum_over_ranks is not None:
        squared = sum_over_ranks(squared)
    # clamp: a zero distance would give sqrt's infinite slope times zero, a NaN gradient
    return squared.clamp_min(1e-30).sqrt() / (h * w)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # noqa: D102
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over the ranks of the default process group, with gradients: the
    backward pass sums the ranks' output gradients, since every rank's output depends on
    every rank's input (what ``torch.distributed.nn.all_reduce`` did before it was
    deprecated)."""
    return _AllReduceSum.apply(t)


def source_label_loss(aux_logits: Tensor, teacher_prob: Tensor, perm: Tensor, lam: float) -> Tensor:
    """Source-label mixup: soft cross-entropy of the source-label head to mixed teacher
    predictions,

    ``L_src = lam * mean_b(-sum_k p[b,k] log q[b,k]) + (1 - lam) * mean_b(-sum_k p[perm][b,k] log q[b,k])``

    with ``p = softmax(teacher logits on clean x)`` and ``log q = log_softmax(aux_logits)``.
    By linearity this is one soft cross-entropy against ``lam * p + (1 - lam) * p[perm]``,
    which is how it is computed.
    """
    target = mix(teacher_prob.detach(), perm, lam)
    logq = F.log_softmax(aux_logits.float(), dim=1)
    return -(target * logq).sum(dim=1).mean()


def head_l2(*heads: nn.Module | None) -> Tensor:
    """``L_head = 0.5 * sum ||theta||^2`` over the weights and biases of the given heads
    (the target classifier and, for SMILE, the source-label head)."""
    params = [p for h in heads if h is not None for p in h.parameters()]
    return 0.5 * sum(p.pow(2).sum() for p in params)
