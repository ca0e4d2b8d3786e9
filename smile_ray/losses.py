"""SMILE's loss terms and the baselines' penalties as pure functions on tensors
(Li et al., 2022; ``docs/method.md``).

Notation: a batch ``x`` of B images with labels ``y``; ``lam`` the mixing weight and
``perm`` a permutation of the batch, so the mixed input is
``x_mix = lam * x + (1 - lam) * x[perm]``. Student outputs are computed on ``x_mix``,
teacher outputs on the clean ``x``.

The baselines' terms (L2-SP, BSS, DELTA, Co-Tuning, LwF, RegSL's reweighting) follow,
after SMILE's; each states its formula and where it departs from the public code.
Data parallel: :func:`all_reduce_sum` and :func:`all_gather_cat` carry gradients, so a
term over the whole global batch (a norm, a sum, singular values, a batch softmax) can
be computed on every rank and DDP's averaging still gives the single-process gradient.
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


# ---------------------------------------------------------------- data parallel


class _AllGatherCat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # noqa: D102
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), t.shape[0]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        import torch.distributed as dist

        # Every rank's output holds every rank's rows: the gradient of rank r's rows is
        # the sum over ranks of their output gradients' slice r (a reduce-scatter, done
        # as an all-reduce because gloo has no reduce-scatter).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_cat(t: Tensor) -> Tensor:
    """The ranks' ``t`` (equal shapes) concatenated along dim 0 in rank order, with
    gradients: the global batch's rows, when each rank holds a contiguous shard.

    Every rank then computes the same batch-level term, and the gradient each rank gets
    for its own rows is N times the single-process one (each of the N ranks' copies of
    the term depends on them), which DDP's averaging over N ranks undoes -- as for
    :func:`all_reduce_sum`."""
    return _AllGatherCat.apply(t)


# ---------------------------------------------------------------- baselines


class _L2SPPenalty(torch.autograd.Function):
    # forward(ref_params, *params): the value; backward: g * (p_i - p0_i) for each p_i.
    @staticmethod
    def forward(ctx, ref_params: list[Tensor], *params: Tensor) -> Tensor:  # noqa: D102
        diffs = torch._foreach_sub(params, ref_params)
        norms = torch._foreach_norm(diffs, 2, dtype=torch.float64)
        ctx.save_for_backward(*diffs)
        return (0.5 * torch.stack(norms).square().sum()).float()

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        grads = torch._foreach_mul(ctx.saved_tensors, grad)
        return (None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:])))


def l2sp_penalty(params: list[Tensor], ref_params: list[Tensor]) -> Tensor:
    """L2-SP's starting-point term (Li et al., ICML 2018): ``0.5 * sum_i ||p_i - p0_i||^2``
    over paired lists of float32 tensors, the references detached (a constant).

    A handful of kernels for any number of tensors rather than about eight per tensor
    (ResNet-50's body has 161): one ``_foreach_sub`` for the differences ``d_i``, one
    ``_foreach_norm`` for their norms, and in backward one ``_foreach_mul``, the gradient
    ``g * d_i`` written directly (a custom autograd function), so autograd records one
    node instead of a graph per tensor. The gradient is bit-identical to autograd's of
    the per-tensor formula ``0.5 * sum_i (p_i - p0_i).pow(2).sum()``, ``(0.5 g) * (2 d_i)``:
    scaling by 0.5 and 2 is exact in floating point. The value is not bit-identical: each
    ``||d_i||^2`` accumulates in float64 (the norms' ``dtype``), then the total is rounded
    to float32 once, so it is the exact sum rounded, where the per-tensor formula's
    float32 reductions are off by a few parts in 1e8 on ResNet-50 (CPU's float32
    ``_foreach_norm`` accumulates serially and is off by ~6e-5: hence float64). The value
    only enters the logged loss; the update reads the gradient.
    """
    if len(params) != len(ref_params):
        raise ValueError(f"{len(params)} parameters against {len(ref_params)} references")
    # no detach needed: forward runs without autograd and apply() tracks only ``params``
    return _L2SPPenalty.apply(list(ref_params), *params)


def bss_penalty(features: Tensor, k: int) -> Tensor:
    """Batch Spectral Shrinkage (Chen et al., NeurIPS 2019): ``sum_{i=1..k} sigma_{-i}(F)^2``,
    the k smallest squared singular values of the ``B x d`` feature matrix ``F`` (there
    are ``min(B, d)``; a larger k takes them all). Gradients flow through the SVD."""
    sigma = torch.linalg.svdvals(features.float())  # descending
    return sigma[-min(k, sigma.numel()):].pow(2).sum()


def delta_penalty(fmaps: list[Tensor], ref_fmaps: list[Tensor], channel_weights: list[Tensor] | None = None) -> Tensor:
    """DELTA's behavioural term (Li et al., ICLR 2019) over layers j, summed over the batch
    (no mean: it grows with B), the reference maps ``FM0`` detached:

    * ``channel_weights`` None (feature-map form): ``sum_j 0.5 * ||FM_j - FM0_j||_F^2``;
    * attention form, ``a_j`` a weight per channel of layer j (``C_j`` of them, summing
      to 1): ``sum_j 0.5 * sum_b sum_c C_j * a_{j,c} * ||FM_{j,b,c} - FM0_{j,b,c}||_2^2 / (H_j * W_j)``.
    """
    total = fmaps[0].new_zeros((), dtype=torch.float32)
    weights = channel_weights if channel_weights is not None else [None] * len(fmaps)
    for fm, ref, a in zip(fmaps, ref_fmaps, weights, strict=True):
        sq = (fm.float() - ref.detach().float()).pow(2)
        if a is None:
            total = total + 0.5 * sq.sum()
        else:
            c, h, w = fm.shape[1:]
            per_channel = sq.sum(dim=(0, 2, 3))  # sum over batch and positions
            total = total + 0.5 * c * (a.float() * per_channel).sum() / (h * w)
    return total


def cotuning_relationship(source_probs: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Co-Tuning's category relationship in its direct form (You et al., NeurIPS 2020, as
    TLlib computes it): ``R[c] = mean of source_probs over the images of target class c``,
    a ``(num_classes, C_source)`` matrix whose rows are distributions ``p(y_s | y_t = c)``.
    A class without images gets a zero row (its images then add no Co-Tuning loss)."""
    probs = source_probs.float()
    sums = probs.new_zeros(num_classes, probs.shape[1]).index_add_(0, labels, probs)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(probs)
    return sums / counts[:, None]


def cotuning_loss(source_logits: Tensor, labels: Tensor, relationship: Tensor) -> Tensor:
    """Co-Tuning's source-head term: ``mean_b(-sum_k R[y_b, k] * log softmax(source_logits_b)_k)``,
    the soft cross-entropy of the source head to each label's relationship row."""
    target = relationship[labels].detach()
    return -(target * F.log_softmax(source_logits.float(), dim=1)).sum(dim=1).mean()


def lwf_loss(logits: Tensor, ref_logits: Tensor, temperature: float) -> Tensor:
    """Learning without Forgetting (Li and Hoiem, 2017), as TLlib's knowledge distillation:
    ``mean_b KL(softmax(ref_logits_b / T) || softmax(logits_b / T))``, the recorded
    pre-trained logits detached; no ``T^2`` factor."""
    log_p = F.log_softmax(ref_logits.detach().float() / temperature, dim=1)
    log_q = F.log_softmax(logits.float() / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def softmax_weighted_loss(losses: Tensor, temperature: float) -> Tensor:
    """RegSL's example reweighting (Li and Zhang, NeurIPS 2021): ``sum_i w_i * l_i`` with
    ``w = softmax(-l / T)`` over the batch, the weights detached: confident (low-loss)
    examples weigh more, likely-mislabelled ones less."""
    weights = torch.softmax(-losses.detach().float() / temperature, dim=0)
    return (weights * losses.float()).sum()
