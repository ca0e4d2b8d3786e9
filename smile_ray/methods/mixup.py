"""Mixup fine-tuning (Zhang et al., ICLR 2018):

``L = lam * CE(f(x_mix), y) + (1 - lam) * CE(f(x_mix), y[perm]) + head_l2_weight * L_head``
with ``x_mix = lam * x + (1 - lam) * x[perm]`` and ``lam`` the folded Beta(alpha, alpha)
draw. It shares SMILE's schedule: plain fine-tuning for the final ``plain_tail_fraction``
of steps (switch ``plain_tail``), so that SMILE with ``feature_mixup`` and
``source_label`` off is exactly this method (``docs/method.md``).
"""
from __future__ import annotations

from smile_ray.losses import mix, mixup_cross_entropy
from smile_ray.methods.base import Method


class Mixup(Method):
    def loss(self, model, x, y, step):
        if self.in_plain_tail(step):
            return self.plain_loss(model, x, y)
        lam, perm = self.draw_mix(x, step)
        parts = {"cls": mixup_cross_entropy(model(mix(x, perm, lam)).logits, y, perm, lam)}
        return self.add_head_l2(model, parts["cls"], parts), parts
