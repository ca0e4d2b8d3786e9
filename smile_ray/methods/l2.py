"""L2: plain fine-tuning (Donahue et al., 2014) -- cross-entropy on clean images, SGD
weight decay on every parameter, and the head L2 ``0.5 * ||theta_head||^2`` of the
reference implementation (switch ``head_l2``)."""
from __future__ import annotations

from smile_ray.methods.base import Method


class L2(Method):
    def loss(self, model, x, y, step):
        return self.plain_loss(model, x, y)
