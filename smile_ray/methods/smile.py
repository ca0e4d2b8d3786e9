"""SMILE: Sample-to-feature Mixup for Efficient Transfer Learning (Li et al., 2022).

For a batch ``x`` with labels ``y``, a folded ``lam ~ Beta(alpha, alpha)`` and a
permutation ``perm``, the student sees ``x_mix = lam * x + (1 - lam) * x[perm]`` and the
mean teacher (a copy of the pre-trained model with its source classifier, eval mode, no
gradients) sees the clean ``x``. The loss is

    L = L_cls + feature_weight * L_feat + source_label_weight * L_src + head_l2_weight * L_head

with ``L_cls`` label mixup, ``L_feat`` the distance of the student's feature map to the
mixed teacher feature maps, ``L_src`` the soft cross-entropy of the source-label head to
the mixed teacher predictions (formulas in :mod:`smile_ray.losses`). The final
``plain_tail_fraction`` of steps is plain fine-tuning (CE on clean images + head L2).

**The mean teacher.** Every ``ema_every`` steps of the regularised phase the teacher's
body moves towards the student's with the per-update decay ``d``:

    theta_T <- d * theta_T + (1 - d) * theta_S      (every body parameter)
    mu_T    <- d * mu_T    + (1 - d) * mu_S         (every BatchNorm running_mean)
    var_T   <- d * var_T   + (1 - d) * var_S        (every BatchNorm running_var)

The statistics follow the reference: its ``update_mean_teacher`` (PaddlePaddle/Research,
``CV/SMILE/finetune.py``) walks the teacher's ``named_parameters()`` skipping ``fc.*``,
and in Paddle a BatchNorm's ``_mean`` and ``_variance`` are parameters. They matter
because the teacher runs in eval mode: its running statistics normalise every feature
and source-label target, and where target images differ from the source's (Fashion-MNIST
from ImageNet) a teacher that keeps the source statistics is off the target's
distribution. ``num_batches_tracked`` (a count, not a parameter in Paddle) is left
alone; the teacher's source classifier stays pre-trained, as in the reference.
``ema_statistics=false`` averages the parameters only (the statistics stay pre-trained),
this project's behaviour before issue 35, kept for the ablation.

``d`` is ``ema_decay`` (0.999), unless ``ema_decay_horizon`` = H > 0: then
``d = ema_decay ** (U(H) / U(steps))`` with ``U(S)`` the number of updates in an S-step
run (:func:`teacher_updates`), so that ``d ** U(steps) == ema_decay ** U(H)``: the
teacher keeps the same share of the pre-trained model at the end of a short run as the
reference's teacher keeps after 9,000 steps (``0.999 ** 800 = 0.45``). Without it a
150-step run makes 13 updates and its teacher keeps ``0.999 ** 13 = 98.7 %`` of the
pre-trained model: on short runs the "mean teacher" is the frozen source model, and the
``mean_teacher`` ablation arm cannot show anything (``docs/method.md``). ``method_info``
records ``ema_decay_per_update`` and ``teacher_updates``.

Deviations from the reference: it updates at ``iter % 10 == 0``, after the losses and
before the optimiser step; we update after the step at ``(step + 1) % ema_every == 0``.
The parameters then take the same values, each used one step earlier; the statistics
averaged in are the student's after that step's forward, where the reference's (iter 10)
include the next batch's forward: they lag one batch. The teacher is not updated in the
plain tail, where nothing reads it (the reference does not update there either: its
update sits in the SMILE branch). Under data parallelism the student's running
statistics differ between ranks after a step (DDP broadcasts rank 0's at the next
forward), so the teacher's averaged statistics are rank 0's, broadcast after each
update: every rank keeps the same teacher, the one rank 0 would have alone.

Components (config switches, ``docs/method.md``): ``feature_mixup``, ``source_label``,
``mean_teacher``, ``label_mixup``, ``head_l2``, ``plain_tail``. A component that is off
costs nothing: without ``feature_mixup`` and ``source_label`` there is no teacher and no
teacher forward; with mixing off as well the step is plain fine-tuning.

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
from torch import Tensor, nn

from smile_ray.config import KEYS
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


def teacher_updates(steps: int, ema_every: int, plain_tail_start: int) -> int:
    """Mean-teacher updates in a run: one after every step ``s < plain_tail_start`` with
    ``(s + 1) % ema_every == 0``, i.e. ``plain_tail_start // ema_every`` (the reference's
    9,000 steps with a 1,000-step tail: 800). ``steps`` bounds the start."""
    return min(plain_tail_start, steps) // ema_every


def ema_decay_per_update(config) -> float:
    """The decay of one teacher update: ``ema_decay``, or, with ``ema_decay_horizon`` H,
    ``ema_decay ** (U(H) / U(steps))`` (module docstring) so that the run's total decay
    ``d ** U(steps)`` equals ``ema_decay ** U(H)``. A run without updates keeps
    ``ema_decay`` (nothing reads it)."""
    c = config
    if not c.ema_decay_horizon:
        return c.ema_decay
    ours = teacher_updates(c.steps, c.ema_every, c.plain_tail_start)
    horizon = c.replace(steps=c.ema_decay_horizon)  # the same tail fraction and update interval, H steps
    theirs = teacher_updates(horizon.steps, c.ema_every, horizon.plain_tail_start)
    if ours == 0:
        return c.ema_decay
    return c.ema_decay ** (theirs / ours)


def batchnorm_statistics(body: nn.Module) -> list[Tensor]:
    """The running mean and variance of every BatchNorm in ``body``, in module order
    (``num_batches_tracked`` aside)."""
    out = []
    for m in body.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out += [m.running_mean, m.running_var]
    return out


class Smile(Method):
    def __init__(self, config, rank=0, world_size=1):
        super().__init__(config, rank, world_size)
        self.uses_source_head = config.source_label
        self.uses_teacher = config.feature_mixup or config.source_label
        self.mixes = self.uses_teacher or config.label_mixup
        self.teacher = None

    @classmethod
    def used_keys(cls, config):
        """The keys declared for smile, less those a missing teacher idles: without
        ``feature_mixup`` and ``source_label`` there is no teacher (no EMA key is read),
        and nothing is mixed unless ``label_mixup`` is on (``mixup_alpha`` unread)."""
        used = super().used_keys(config)
        if not (config.feature_mixup or config.source_label):
            used -= {k for k in used if KEYS[k].metadata["when"] == "mean_teacher"}
            if not config.label_mixup:
                used.discard("mixup_alpha")
        return used

    @classmethod
    def may_skip_parameters(cls, config):
        # In the plain tail the source-label head gets no gradient unless the head L2 reaches it.
        return config.source_label and config.plain_tail and not config.head_l2

    def attach(self, model, source, task=None, cache_dir=None):
        super().attach(model, source, task, cache_dir)
        if not self.uses_teacher:
            return
        c = self.config
        self.teacher = copy.deepcopy(source).eval().requires_grad_(False)
        student = unwrap(model).body
        self._teacher_tensors = list(self.teacher.body.parameters())
        self._student_tensors = list(student.parameters())
        self._teacher_stats = batchnorm_statistics(self.teacher.body) if c.ema_statistics else []
        self._student_stats = batchnorm_statistics(student) if c.ema_statistics else []
        if len(self._teacher_stats) != len(self._student_stats):
            raise ValueError("the student's body has other BatchNorm layers than the teacher's")
        self.ema_decay = ema_decay_per_update(c)
        if c.mean_teacher:
            self._info.update(ema_decay_per_update=self.ema_decay,
                              teacher_updates=teacher_updates(c.steps, c.ema_every, c.plain_tail_start))

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
        # One fused pass over the body parameters (and BatchNorm statistics): t <- t + (1 - d) * (s - t).
        torch._foreach_lerp_(self._teacher_tensors + self._teacher_stats,
                             self._student_tensors + self._student_stats, 1.0 - self.ema_decay)
        if self._teacher_stats and self.world_size > 1:
            self._share_rank0_statistics()

    def _share_rank0_statistics(self) -> None:
        """Every rank's teacher statistics := rank 0's (one flat broadcast per update)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        flat = torch.cat([t.reshape(-1) for t in self._teacher_stats])
        dist.broadcast(flat, src=0)
        torch._foreach_copy_(self._teacher_stats, [v.view_as(t) for v, t in
                                                   zip(flat.split([t.numel() for t in self._teacher_stats]),
                                                       self._teacher_stats)])

    def state_dict(self):
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def rank_state(self):
        """The mean teacher's parameters and floating-point buffers: each rank updates its
        own copy from the same student, so they must agree."""
        if self.teacher is None:
            return []
        return [t for t in self.teacher.state_dict().values() if t.is_floating_point()]

    def load_state_dict(self, state):
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
