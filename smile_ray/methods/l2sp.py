"""L2-SP: the starting point as the reference (Li, Grandvalet and Davoine, ICML 2018).

    L = CE(g(f(x)), y) + l2sp_weight * 0.5 * sum_{p in backbone} ||p - p0||^2
        + head_l2_weight * 0.5 * ||theta_head||^2

``p0`` a detached copy of the pre-trained backbone, the sum over every parameter of the
body (BatchNorm affine included, running statistics not: they are buffers), the head
term the shared head L2 (the ``b`` of the paper; switch ``head_l2``).

Deviations (``docs/method.md``): the head weight ``b`` is the shared ``head_l2_weight``
(1e-4, RIFLE's code's value; TLlib uses 0.01), and SGD's weight decay is the shared
``weight_decay`` (the public codes switch it off; set ``weight_decay=0`` for theirs), so
that only the regulariser differs between methods. Data parallel: the term depends on
the parameters only, so every rank computes the same value and gradient.
"""
from __future__ import annotations

from smile_ray.losses import l2sp_penalty
from smile_ray.methods.base import Method, unwrap


class L2SP(Method):
    def attach(self, model, source, task=None, cache_dir=None):
        super().attach(model, source, task, cache_dir)
        self._params = list(unwrap(model).body.parameters())
        self._start = [p.detach().clone() for p in source.body.parameters()]

    def loss(self, model, x, y, step):
        total, parts = self.plain_loss(model, x, y)
        parts["l2sp"] = l2sp_penalty(self._params, self._start)
        return total + self.config.l2sp_weight * parts["l2sp"], parts
