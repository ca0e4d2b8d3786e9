"""RegSL: regularised self-labelling (Li and Zhang, NeurIPS 2021).

Up to three parts on top of plain fine-tuning (CE + ``head_l2_weight * L_head``): the
constraints (1) always; relabelling (2) and reweighting (3) only with
``regsl_self_labelling=true``. The default is the constraints alone, because the SMILE
paper's tables are clean-label tasks and the public code's clean-label script
(``train_constraint.py``) runs the constraints alone; (2) and (3) belong to its
label-noise script (``train_label_noise.py``, 20 % noisy labels), as do the radii below.

1. **Layer-wise distance constraints.** After every optimiser step each weight ``W`` of
   a convolution or linear layer in backbone stage l (biases and BatchNorm aside) is
   projected back into a Frobenius ball around its pre-trained value,
   ``W <- W0 + (W - W0) * min(1, D_l / ||W - W0||_F)``, with ``D_1 = D_2 = D``,
   ``D_l = D * gamma^(l - 2)`` for l >= 3 (ResNet: ``layer1`` .. ``layer4``; the stem is
   not constrained, as in the public code; stages as
   :func:`~smile_ray.methods.base.stages` finds them). The target classifier's weight is
   projected into a ball of radius ``regsl_head_radius`` around 0.
2. **Relabelling.** Every training image has a stored label, at first its own. From step
   ``regsl_relabel_start_fraction * steps`` on, when the model's softmax on an image
   (the step's training forward, before the loss) gives another class more than
   ``regsl_relabel_threshold``, that class replaces the stored label; the loss uses the
   stored labels.
3. **Reweighting.** From step ``regsl_reweight_start_fraction * steps`` on, the CE is
   ``sum_i w_i * CE_i`` with ``w = softmax(-CE / T)`` over the batch, weights detached
   (:func:`~smile_ray.losses.softmax_weighted_loss`).

Defaults are the public code's published runs: D = 7.8, head radius 14.08 (its README's
ResNet-18 runs of ``train_label_noise.py``), gamma = 1 (its configs' ``scale_factor``),
threshold 0.9, T = 2, and the starts at epochs 10 and 5 of its 30 (1-based), i.e. after
9/30 and 4/30 of the steps. Its clean-label configs (``configs/config_constraint_*.json``)
use another norm (``reg_norm: inf-op``) with radii 1 for body and head, which we do not
implement: with the Frobenius constraints the radii are the label-noise runs', a
starting point for tuning on clean labels, not a published clean-label setting.

Deviations: the shared SGD, schedule and weight decay, not the public code's Adam (lr
1e-4, amsgrad) with weight decay 0; the public code also bounds each BatchNorm scale
divided by sqrt(running variance) element-wise with the same radius, which we do not;
T stays constant (the public code decays it by exp(-0.1) per epoch, to half at most).

Data parallel: the stored labels are identical on every rank: the predictions of all
ranks are all-gathered and applied to the global batch's indices in rank order, as one
process would. The reweighting's softmax runs over the global batch: per-image losses
are all-gathered with gradients (:func:`~smile_ray.losses.all_gather_cat`), so every rank
holds the single-process loss, and DDP's averaging gives its gradient. The projection
acts on parameters that are identical on every rank.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smile_ray.losses import all_gather_cat, softmax_weighted_loss
from smile_ray.methods.base import Method, stages, unwrap


def project_to_ball(weights: list[Tensor], centres: list[Tensor | None], radii: list[float]) -> None:
    """In place: ``W <- C + (W - C) * min(1, r / ||W - C||_F)`` for each weight (centre None
    is the origin). No host synchronisation."""
    for w, c, r in zip(weights, centres, radii, strict=True):
        d = w if c is None else w - c
        scale = (r / d.norm().clamp_min(1e-12)).clamp(max=1.0)
        w.copy_(d * scale if c is None else c + d * scale)


def constrained_weights(body: nn.Module, radius: float, gamma: float) -> list[tuple[str, float]]:
    """``(name in body, radius)`` for every conv/linear weight of each stage l (1-based):
    ``radius * gamma^max(0, l - 2)``."""
    out = []
    for l, (stage_name, stage) in enumerate(stages(body), start=1):
        r = radius * gamma ** max(0, l - 2)
        for name, m in stage.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                out.append((f"{stage_name}.{name}.weight" if name else f"{stage_name}.weight", r))
    return out


class RegSL(Method):
    def __init__(self, config, rank=0, world_size=1):
        super().__init__(config, rank, world_size)
        never = config.steps  # constraints alone: neither part starts inside the run
        on = config.regsl_self_labelling
        self.relabel_start = round(config.regsl_relabel_start_fraction * config.steps) if on else never
        self.reweight_start = round(config.regsl_reweight_start_fraction * config.steps) if on else never
        self._info.update(relabel_start_step=self.relabel_start, reweight_start_step=self.reweight_start)

    def attach(self, model, source, task=None, cache_dir=None):
        super().attach(model, source, task, cache_dir)
        c, net = self.config, unwrap(model)
        device = next(net.parameters()).device
        named = dict(net.body.named_parameters())
        start = dict(source.body.named_parameters())
        pairs = constrained_weights(net.body, c.regsl_radius, c.regsl_gamma)
        self._weights = [named[n] for n, _ in pairs] + [net.classifier.weight]
        self._centres = [start[n].detach().clone() for n, _ in pairs] + [None]
        self._radii = [r for _, r in pairs] + [c.regsl_head_radius]
        self._info["constrained"] = {n: r for n, r in pairs} | {"classifier.weight": c.regsl_head_radius}
        self.labels = self.need_task().train_labels().to(device).clone()
        self.relabelled = torch.zeros((), dtype=torch.long, device=device)

    @torch.no_grad()
    def relabel(self, logits: Tensor, step: int) -> None:
        """Overwrite the stored labels of confidently re-classified images of the global batch.

        Without a host synchronisation: every position of the batch writes, a changed one
        its prediction, the others the label they hold (a boolean mask's selection,
        ``labels[idx[change]] = pred[change]``, has a data-dependent size, which CUDA
        can only learn by waiting for the step). An image may sit twice in one batch
        (a batch straddling two epochs); the selection wrote its changed positions in
        batch order, the last one winning, so each position of an image writes the
        prediction of that image's last changed position (a ``scatter_reduce`` amax of
        positions), and duplicates write the same value whatever order the writes take.
        """
        conf, pred = torch.softmax(logits.float(), dim=1).max(dim=1)
        if self.world_size > 1:
            conf, pred = all_gather_cat(conf), all_gather_cat(pred)
        idx = self.global_batch_indices(step, logits.device)
        held = self.labels[idx]
        change = (conf > self.config.regsl_relabel_threshold) & (pred != held)
        pos = torch.where(change, torch.arange(len(idx), device=idx.device), -1)
        last = torch.full_like(self.labels, -1).scatter_reduce_(0, idx, pos, "amax")[idx]
        self.labels[idx] = torch.where(last >= 0, pred[last.clamp_min(0)], held)
        self.relabelled += change.sum()

    def loss(self, model, x, y, step):
        c = self.config
        logits = model(x).logits
        if step >= self.relabel_start:
            self.relabel(logits.detach(), step)
        labels = self.labels[self.batch_indices(step, y)]
        parts = {}
        if step >= self.reweight_start:
            per_image = F.cross_entropy(logits.float(), labels, reduction="none")
            if self.world_size > 1:
                per_image = all_gather_cat(per_image)
            parts["cls"] = softmax_weighted_loss(per_image, c.regsl_temperature)
        else:
            parts["cls"] = F.cross_entropy(logits, labels)
        return self.add_head_l2(model, parts["cls"], parts), parts

    @torch.no_grad()
    def after_step(self, model, step, optimizer=None):
        project_to_ball(self._weights, self._centres, self._radii)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "relabelled": int(self.relabelled)}

    def state_dict(self):
        return {"labels": self.labels, "relabelled": self.relabelled}

    def load_state_dict(self, state):
        self.labels.copy_(state["labels"])
        self.relabelled.copy_(state["relabelled"])
