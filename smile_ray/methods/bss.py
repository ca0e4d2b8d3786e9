"""BSS: Batch Spectral Shrinkage (Chen, Wang, Fu, Long and Wang, NeurIPS 2019).

    L = CE(g(f(x)), y) + bss_weight * sum_{i=1..bss_k} sigma_{-i}(F)^2 + head_l2_weight * L_head

with ``F`` the ``B x d`` matrix of pooled backbone features of the batch (before the
head) and ``sigma_{-i}`` its i-th smallest singular value; gradients flow through the
SVD (``torch.linalg.svdvals``, in fp32). Defaults eta = 0.001, k = 1.

Data parallel: the singular values are those of the *global* batch's features. Each
rank all-gathers the features with gradients (:func:`~smile_ray.losses.all_gather_cat`),
so every rank computes the single-process value, and DDP's averaging of the N-fold
gradients gives the single-process gradient (``tests/test_baselines.py``).
"""
from __future__ import annotations

import torch.nn.functional as F

from smile_ray.losses import all_gather_cat, bss_penalty
from smile_ray.methods.base import Method


class BSS(Method):
    def loss(self, model, x, y, step):
        c = self.config
        out = model(x)
        parts = {"cls": F.cross_entropy(out.logits, y)}
        features = out.fmap.float().mean(dim=(2, 3))  # the pooled feature the head sees
        if self.world_size > 1:
            features = all_gather_cat(features)
        parts["bss"] = bss_penalty(features, c.bss_k)
        return self.add_head_l2(model, parts["cls"] + c.bss_weight * parts["bss"], parts), parts
