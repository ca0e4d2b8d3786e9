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

Components (config switches, ``METHOD.md``): ``feature_mixup``, ``source_label``,
``mean_teacher``, ``label_mixup``, ``head_l2``, ``plain_tail``. A component that is off
costs nothing: without ``feature_mixup`` and ``source_label`` there is no teacher and no
teacher forward; with mixing off as well the step is plain fine-tuning.

Deviation from the reference, for ``label_mixup=false`` only: the clean batch (for the
target classifier's CE) and the mixed batch (for the two SMILE terms) go through the
student in one forward pass of their concatenation, so BatchNorm normalises them
together; a single forward keeps the step DDP-friendly.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from smile_ray.losses import feature_mixup_loss, mix, mixup_cross_entropy, source_label_loss
from smile_ray.methods import METHODS, Method, unwrap


@METHODS.register("smile")
class Smile(Method):
    def __init__(self, config, rank=0):
        super().__init__(config, rank)
        self.uses_source_head = config.source_label
        self.uses_teacher = config.feature_mixup or config.source_label
        self.mixes = self.uses_teacher or config.label_mixup
        self.teacher = None

    @staticmethod
    def unused_keys(config):
        teacher = config.feature_mixup or config.source_label
        unused = set()
        if not config.feature_mixup:
            unused.add("feature_weight")
        if not config.source_label:
            unused.add("source_label_weight")
        if not (teacher and config.mean_teacher):
            unused |= {"ema_decay", "ema_every"}
        if not (teacher or config.label_mixup):
            unused.add("mixup_alpha")
        if not config.head_l2:
            unused.add("head_l2_weight")
        if not config.plain_tail:
            unused.add("plain_tail_fraction")
        return unused

    def attach(self, model, source):
        if not self.uses_teacher:
            return
        self.teacher = copy.deepcopy(source).eval().requires_grad_(False)
        self._teacher_params = list(self.teacher.body.parameters())
        self._student_params = list(unwrap(model).body.parameters())

    def loss(self, model, x, y, step):
        c = self.config
        if self.in_plain_tail(step) or not self.mixes:
            return self.plain_loss(model, x, y)
        lam, perm = self.draw_mix(x, step)
        x_mix = mix(x, perm, lam)
        parts = {}
        if c.label_mixup:
            out = model(x_mix)
            parts["cls"] = mixup_cross_entropy(out.logits, y, perm, lam)
        else:
            both = model(torch.cat([x, x_mix]))
            b = len(x)
            parts["cls"] = F.cross_entropy(both.logits[:b], y)
            out = type(both)(both.logits[b:], both.fmap[b:], None if both.aux_logits is None else both.aux_logits[b:])
        total = parts["cls"]
        if self.uses_teacher:
            with torch.inference_mode():
                t_fmap, t_logits = self.teacher(x)
                t_prob = torch.softmax(t_logits.float(), dim=1)
            if c.feature_mixup:
                parts["feat"] = feature_mixup_loss(out.fmap, t_fmap, perm, lam)
                total = total + c.feature_weight * parts["feat"]
            if c.source_label:
                parts["src"] = source_label_loss(out.aux_logits, t_prob, perm, lam)
                total = total + c.source_label_weight * parts["src"]
        return self.add_head_l2(model, total, parts), parts

    @torch.no_grad()
    def after_step(self, model, step):
        c = self.config
        if self.teacher is None or not c.mean_teacher or (step + 1) % c.ema_every:
            return
        # One fused pass over the body parameters: t <- t + (1 - d) * (s - t).
        torch._foreach_lerp_(self._teacher_params, self._student_params, 1.0 - c.ema_decay)

    def state_dict(self):
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state):
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
