"""SMILE: Sample-to-feature Mixup for Efficient Transfer Learning (Li et al., 2022).

For a batch ``x`` with labels ``y``, a folded ``lam ~ Beta(alpha, alpha)`` and a
permutation ``perm``, the student sees ``x_mix = lam * x + (1 - lam) * x[perm]`` and the
mean teacher (a copy of the pre-trained model with its source classifier, eval mode, no
gradients) sees the clean ``x``. The loss is

    L = L_cls + feature_weight * L_feat + source_label_weight * L_src + head_l2_weight * L_head

with ``L_cls`` label mixup, ``L_feat`` the distance of the student's feature map to the
mixed teacher feature maps, ``L_src`` the soft cross-entropy of the source-label head to
the mixed teacher predictions (formulas in :mod:`smile_ray.losses`). Every ``ema_every``
steps the teacher's *body* parameters move towards the student's,
``theta_T <- ema_decay * theta_T + (1 - ema_decay) * theta_S``; BatchNorm running
statistics and the teacher's source classifier are left as pre-trained. The final
``plain_tail_fraction`` of steps is plain fine-tuning (CE on clean images + head L2).

Components (config switches, ``docs/method.md``): ``feature_mixup``, ``source_label``,
``mean_teacher``, ``label_mixup``, ``head_l2``, ``plain_tail``. A component that is off
costs nothing: without ``feature_mixup`` and ``source_label`` there is no teacher and no
teacher forward; with mixing off as well the step is plain fine-tuning. The teacher is
not updated in the plain tail, where nothing reads it.

``label_mixup=false`` changes the label term alone: the target classifier's loss is a
plain CE on a second, clean forward of the student, and the mixed forward that feeds the
two SMILE terms is exactly the full method's. The clean forward runs with BatchNorm's
running-statistics momentum at 0, so the running statistics (used at evaluation) see
the mixed batches only, as in the full method; its batch statistics are the clean
batch's own, as in plain fine-tuning. What remains different is the label term and its
cost (one more forward and backward per step).

Under data parallelism (``world_size`` > 1) the feature loss is the norm over the whole
global batch (the squared norm is summed over ranks before the square root, with
gradients), so N workers compute the single-process loss of the same global batch.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from smile_ray.losses import all_reduce_sum, feature_mixup_loss, mix, mixup_cross_entropy, source_label_loss
from smile_ray.methods.base import Method, unwrap


@contextmanager
def frozen_batchnorm_statistics(model: nn.Module):
    """Train-mode forwards inside leave BatchNorm running statistics as they are."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


class Smile(Method):
    def __init__(self, config, rank=0, world_size=1):
        super().__init__(config, rank, world_size)
        self.uses_source_head = config.source_label
        self.uses_teacher = config.feature_mixup or config.source_label
        self.mixes = self.uses_teacher or config.label_mixup
        self.teacher = None

    @classmethod
    def used_keys(cls, config):
        teacher = config.feature_mixup or config.source_label
        used = super().used_keys(config) | {"feature_mixup", "source_label", "mean_teacher", "label_mixup", "plain_tail"}
        if config.feature_mixup:
            used.add("feature_weight")
        if config.source_label:
            used.add("source_label_weight")
        if teacher and config.mean_teacher:
            used |= {"ema_decay", "ema_every"}
        if teacher or config.label_mixup:
            used.add("mixup_alpha")
        if config.plain_tail:
            used.add("plain_tail_fraction")
        return used

    @classmethod
    def may_skip_parameters(cls, config):
        # In the plain tail the source-label head gets no gradient unless the head L2 reaches it.
        return config.source_label and config.plain_tail and not config.head_l2

    def attach(self, model, source, task=None, cache_dir=None):
        super().attach(model, source, task, cache_dir)
        if not self.uses_teacher:
            return
        self.teacher = copy.deepcopy(source).eval().requires_grad_(False)
        self._teacher_params = list(self.teacher.body.parameters())
        self._student_params = list(unwrap(model).body.parameters())

    def compiled_modules(self):
        return (self.teacher,) if self.teacher is not None else ()

    def loss(self, model, x, y, step):
        c = self.config
        if self.in_plain_tail(step) or not self.mixes:
            return self.plain_loss(model, x, y)
        lam, perm = self.draw_mix(x, step)
        x_mix = mix(x, perm, lam)
        parts = {}
        out = model(x_mix)
        if c.label_mixup:
            parts["cls"] = mixup_cross_entropy(out.logits, y, perm, lam)
        else:
            with frozen_batchnorm_statistics(model):
                parts["cls"] = F.cross_entropy(model(x).logits, y)
        total = parts["cls"]
        if self.uses_teacher:
            with torch.inference_mode():
                t_fmap, t_logits = self.teacher(x)
                t_prob = torch.softmax(t_logits.float(), dim=1)
            if c.feature_mixup:
                parts["feat"] = feature_mixup_loss(out.fmap, t_fmap, perm, lam,
                                                   sum_over_ranks=all_reduce_sum if self.world_size > 1 else None)
                total = total + c.feature_weight * parts["feat"]
            if c.source_label:
                parts["src"] = source_label_loss(out.aux_logits, t_prob, perm, lam)
                total = total + c.source_label_weight * parts["src"]
        return self.add_head_l2(model, total, parts), parts

    @torch.no_grad()
    def after_step(self, model, step, optimizer=None):
        c = self.config
        if self.teacher is None or not c.mean_teacher or (step + 1) % c.ema_every or self.in_plain_tail(step):
            return
        # One fused pass over the body parameters: t <- t + (1 - d) * (s - t).
        torch._foreach_lerp_(self._teacher_params, self._student_params, 1.0 - c.ema_decay)

    def state_dict(self):
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state):
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
